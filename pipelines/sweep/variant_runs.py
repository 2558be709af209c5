"""A sweep's variants as MLflow runs: the FP32 reference and each variant made and measured by the VariantRunner,
recorded as a child run of the sweep's parent run (or reused, with --resume), each plot drawn in the background.
`ptqflow sweep` runs them all (sweep.Sweep); `ptqflow tune` runs one per trial, one VariantRuns per calibration size."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.markup import escape

from ptqflow.common.errors import TrackingError, failure_reason, first_line
from ptqflow.common.files import file_sha256
from ptqflow.models.backends.base import UnsupportedVariant
from ptqflow.models.backends.engine_check import describe_departures
from ptqflow.models.runtime.latency import BenchConfig
from ptqflow.pipelines.registry.registrar import MeasuredOn, Registrar
from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared.precision import rounded
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.inputs import SweepInputs, with_calibration
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.outcomes import VariantOutcome, outcome_of_run, speedup_b1, speedup_b256
from ptqflow.pipelines.sweep.plot_queue import PlotQueue
from ptqflow.pipelines.sweep.recording import RunRecorder
from ptqflow.pipelines.variants.evaluation import Evaluation
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.runner import VariantResult, VariantRunner
from ptqflow.pipelines.variants.specs import FP32, VariantSpec, config_payload, qconfig_document
from ptqflow.tracking import logged_models, records, runs
from ptqflow.tracking.connection import refused_credentials
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag

FP32_AGREEMENT_WARNING = 0.999  # torch vs ORT FP32 top-1 agreement below this is tagged as a warning

RESUME_HINT = "the sweep stopped: run it again with --resume once the tracking store answers"


class VariantRuns:
    """The variant runs of one sweep on one set of inputs (one calibration set): the runner that makes and measures
    them, the recorder that writes what every run carries, the plot queue and the registrar."""

    def __init__(self, options: SweepOptions, inputs: SweepInputs, work_dir: Path, timer: PhaseTimer | None = None,
                 bench_config: BenchConfig | None = None):
        self.options = options
        self.inputs = inputs
        self.timer = timer or PhaseTimer()
        self.work_dir = work_dir
        runner_options = options.runner_options()
        if bench_config is not None:
            runner_options = replace(runner_options, bench_config=bench_config)
        self.runner = VariantRunner(inputs, work_dir, runner_options, self.timer)
        self.specs = options.specs()
        self.recorder = RunRecorder(options, inputs, work_dir, quantized_from=lambda: self.quantized_from,
                                    float_layers=self.runner.speed_kept)
        self.registrar = Registrar(options.registered_names(), options.gate, MeasuredOn.of(inputs),
                                   mac_share=self.recorder.int8_mac_share)
        self.reference: VariantResult | None = None
        self.plots = PlotQueue()
        self.stop_hint = RESUME_HINT  # what to do when the tracking store stops answering (tune says its own)

    # ---- what ptqflow tune asks of a sweep -------------------------------------------------------------------
    def with_calibration_size(self, size: int, work_dir: Path) -> VariantRuns:
        """A sweep like this one with a calibration set of `size` images (same seed), converted, sharing this sweep's
        FP32 reference (it does not depend on the calibration set), and AdaRound-ing on this sweep's calibration
        set whatever its own size: the size searched is the activation ranges', and AdaRound's result stays cached
        across sizes."""
        inputs = with_calibration(self.inputs, size, self.options.calibration_seed, self.options.validation_size)
        other = VariantRuns(replace(self.options, calibration_size=size), inputs, work_dir, self.timer,
                      self.runner.options.bench_config)
        other.runner.convert(self.specs)
        other.runner.share_reference(self.runner)
        other.runner.round_on(self.inputs.calibration, self.inputs.calibration_digest)
        other.reference = self.reference
        other.stop_hint = self.stop_hint
        return other

    def convert(self, reference_meanwhile: bool = False) -> None:
        """Each backend's starting point for this sweep's variants (VariantRunner.convert)."""
        self.runner.convert(self.specs, reference_meanwhile=reference_meanwhile)

    def diagnose(self, spec: VariantSpec):
        """The per-layer diagnosis of `spec`, quantized again (VariantRunner.diagnose)."""
        return self.runner.diagnose(spec)

    @property
    def quantized_from(self):
        """The ONNX model (ModelProto) every variant quantizes: BatchNorm folded, nodes named."""
        return self.runner.quantization_source.onnx.proto

    def register_run(self, spec: VariantSpec, run) -> list:
        """Register the finished variant run `run` of `spec` as the sweep registers its best variants."""
        return self.registrar.register_best([outcome_of_run(spec, run)], self.reference.evaluation.accuracy)

    def speedup(self, outcome: VariantOutcome) -> float:
        """Batch-256 throughput over the FP32 reference's (batch-1 latency for models fixed at batch 1); 0 untimed."""
        reference = self.reference.bench if self.reference else None
        value = speedup_b256(outcome.bench, reference)
        if value is None:
            value = speedup_b1(outcome.bench, reference)
        return float(value) if value is not None else 0.0

    # ---- FP32 reference ------------------------------------------------------------------------------------
    def run_fp32(self, experiment_id: str, parent_run_id: str, tags: dict[str, str] | None = None) -> VariantOutcome:
        """The FP32 reference's run: accuracy through onnxruntime, onnx2torch's agreement with it, the model."""
        recorder = self.recorder
        with runs.run_scope(experiment_id, FP32, parent_run_id=parent_run_id,
                            tags={Tag.ROLE: Tag.ROLE_VARIANT, Tag.VARIANT: FP32, **(tags or {})}) as run_id:
            records.set_tags(recorder.common_tags(parent_run_id))
            records.log_params(recorder.variant_params(None))
            recorder.log_datasets()
            reference = self.reference = self.runner.run_reference()
            evaluation, torch_agreement = reference.evaluation, reference.torch_agreement
            if torch_agreement is None:
                records.set_tags({Tag.WARNING: f"{self.runner.torch_error}: the PyTorch variants are unsupported "
                                               "and the ONNX Runtime ones round to nearest"})
            elif torch_agreement < FP32_AGREEMENT_WARNING:
                records.set_tags({Tag.WARNING: f"{Tag.WARNING_FP32_MISMATCH}: onnx2torch and onnxruntime "
                                               f"agree on {100 * torch_agreement:.2f}% of top-1 on the first "
                                               f"{reference.torch_check_images} test images"})
            logged = self._log_fp32_files(evaluation)
            self._log_confusion_matrix(run_id, FP32, evaluation)
            recorder.log_metrics({
                Metric.ACCURACY: evaluation.accuracy, Metric.ACCURACY_DELTA_PP: 0.0,
                Metric.TOP1_AGREEMENT: 1.0, Metric.KL_DIVERGENCE: 0.0,
                Metric.MODEL_SIZE_BYTES: self.inputs.model.size_bytes, Metric.COMPRESSION_RATIO: 1.0,
                **({Metric.TORCH_ORT_AGREEMENT: torch_agreement, Metric.TORCH_ORT_IMAGES: reference.torch_check_images}
                   if torch_agreement is not None else {}),
                Metric.TEST_IMAGES: len(self.inputs.test)})
            if reference.bench:
                recorder.log_bench(reference.bench, reference.bench)
            records.set_tags({Tag.STATUS: Tag.STATUS_OK})
        torch_check = (f"onnx2torch agrees on {100 * torch_agreement:.2f}% of the first {reference.torch_check_images}"
                       if torch_agreement is not None else self.runner.torch_error)
        say(f"[green]✓[/] fp32: accuracy {100 * evaluation.accuracy:.2f}% ({escape(torch_check)})")
        return VariantOutcome.of(reference, run_id=run_id, model_uri=logged.model_uri)

    def _log_fp32_files(self, evaluation: Evaluation):
        """The FP32 model as the run's logged model (the metrics logged after are attached to it too) and as files,
        its qconfig note and per-class accuracy. Returns the logged model."""
        float_model = self.runner.float_model
        with tempfile.TemporaryDirectory(dir=self.work_dir) as d:
            logged = logged_models.log_onnx_model(float_model.onnx.path, FP32, Path(d) / "mlflow_model",
                                                  self.runner.example_input, evaluation.scores[:1],
                                                  self.recorder.onnx_requirements(), self.recorder.variant_params(None))
            records.set_tags({Tag.MODEL_FILE_SHA256: file_sha256(logged.model_file),
                              Tag.MODEL_FILE_IN_MODEL: logged.model_file_in_model})
        records.log_file(self.inputs.model.path, Artifact.MODEL_FILE_DIR)
        for relative in self.inputs.model.external_files:  # the .onnx alone would be a model without weights
            records.log_file(self.inputs.model.path.parent / relative,
                             (Path(Artifact.MODEL_FILE_DIR) / relative.parent).as_posix())
        records.log_json({"variant": FP32, "note": "FP32 reference, no quantization"}, Artifact.QCONFIG)
        records.log_json(evaluation.per_class_accuracy, Artifact.PER_CLASS_ACCURACY)
        return logged

    def _log_confusion_matrix(self, run_id: str, name: str, evaluation: Evaluation) -> None:
        self.plots.submit(run_id, Artifact.CONFUSION_MATRIX, Tag.WARNING, plots.confusion_matrix,
                          self.inputs.test.labels, evaluation.predictions, self.inputs.data.class_names,
                          f"{name}: confusion matrix ({len(self.inputs.test)} test images)")

    # ---- one variant ---------------------------------------------------------------------------------------
    def input_key(self, spec: VariantSpec) -> str:
        """SHA-256 of everything that determines a variant's result: same key, same numbers. That includes the
        code (ptqflow's source digest, uncommitted edits and all), the CPU and its int8 instruction sets (int8
        kernels round differently without VNNI; timings differ anyway) and the thread counts (torch's sums run in
        their order; the timings were taken on that many)."""
        from ptqflow.models.runtime.machine import cpu_description
        from ptqflow.pipelines.sweep.recording import torch_threads

        inputs = self.inputs
        cpu_model, cpu_isa = cpu_description()
        payload = {"model_sha256": inputs.model.sha256, "dataset_sha256": inputs.data.digest,
                   "calibration_sha256": inputs.calibration_digest, "variant": spec.name,
                   "validation_sha256": inputs.validation_digest,  # the held-out images that choose the rounding
                   "config": config_payload(spec.config), "test_images": len(inputs.test),
                   "layout": inputs.transform.layout, "preprocessing": inputs.transform.preprocessing.value,
                   "inputs": inputs.input_params(),  # data format, classes, size, resizing, mean/std
                   "bench": self.options.bench, "adaround_iterations": self.options.adaround_iterations,
                   "versions": {k: self.recorder.versions[k] for k in ("torch", "onnxruntime", "onnx2torch", "onnx")},
                   # ptqflow's own code: after a fix, committed or not, an old run is not "the same"
                   "ptqflow": {"version": self.recorder.versions["ptqflow"],
                               "source_sha256": self.recorder.source_sha256},
                   "machine": {"cpu_model": cpu_model, "cpu_int8_isa": cpu_isa, "torch_threads": torch_threads(),
                               "malloc": self.recorder.malloc,
                               "bench_threads": self.runner.options.bench_config.resolved_threads,
                               "latency_threads": self.runner.options.bench_config.latency_threads},
                   "choose_equalization": self.runner.options.choose_equalization}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def previous_run(self, experiment_id: str, spec: VariantSpec):
        """With --resume, a finished run of this variant on identical inputs (reused instead of recomputed)."""
        if not self.options.resume:
            return None
        from ptqflow.tracking.recovery import find_reusable

        return find_reusable(experiment_id, self.input_key(spec))

    def run_variant(self, spec: VariantSpec, experiment_id: str, parent_run_id: str,
                    tags: dict[str, str] | None = None) -> VariantOutcome:
        """Make, measure and record one variant as a child run of `parent_run_id` (extra creation `tags`); with
        --resume, reuse an identical finished run instead. A failure or refusal is the outcome's status."""
        previous = self.previous_run(experiment_id, spec)
        if previous is not None:
            records.set_tags({Tag.REUSED_FROM + spec.name: previous.info.run_id})
            say(f"[green]↺[/] {spec.name}: reused finished run {previous.info.run_id} (same inputs)")
            return outcome_of_run(spec, previous)
        outcome = VariantOutcome(spec.name, spec.framework, spec, status="failed")
        try:
            with runs.run_scope(experiment_id, spec.name, parent_run_id=parent_run_id,
                                tags={Tag.ROLE: Tag.ROLE_VARIANT, Tag.VARIANT: spec.name, **(tags or {})}) as run_id:
                outcome.run_id = run_id
                outcome = self._run_recorded(spec, outcome, parent_run_id)
        except UnsupportedVariant:
            say(f"[yellow]–[/] {spec.name}: unsupported ({outcome.reason})")
            return outcome
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            self._stop_on_tracking_failure(spec, exc)
            outcome.error = exc
            say(f"[red]✗[/] {spec.name}: failed ({outcome.reason})")
            return outcome
        say(f"[green]✓[/] {spec.name}: accuracy {100 * outcome.evaluation.accuracy:.2f}% "
            f"({100 * (outcome.evaluation.accuracy - self.reference.evaluation.accuracy):+.2f} pp), "
            f"agreement {100 * outcome.fidelity.top1_agreement:.2f}%"
            + (f" (onnxruntime runs it as the same graph as {outcome.scores_from}: its scores)"
               if outcome.scores_from else ""))
        return outcome

    @staticmethod
    def _log_held_out_choices(result: VariantResult, asked: VariantSpec) -> None:
        """Which equalization and rounding the model file holds and the held-out numbers that chose them (with the
        channels bias correction moved, when its weights are AdaRound's); the kept recipe's qconfig."""
        rounding, equalization = result.rounding_choice, result.equalization_choice
        if result.spec.config.adaround_scheme is not None:
            records.log_params({Param.BIAS_CORRECTED_CHANNELS: result.bias_corrected_channels})
        if equalization is not None:
            records.log_params({Param.EQUALIZATION_KEPT: "on" if equalization.chosen else "off"})
            records.log_metrics(rounded({Metric.VALIDATION_AGREEMENT_EQUALIZED: equalization.agreement["on"],
                                         Metric.VALIDATION_AGREEMENT_UNEQUALIZED: equalization.agreement["off"]}))
            records.set_tags({Tag.EQUALIZATION_CHOICE: equalization.summary()})
        if rounding is not None:
            records.log_params({Param.WEIGHT_ROUNDING_KEPT: rounding.chosen})
            if rounding.agreement:  # held-out numbers, when the two were compared
                records.log_metrics(rounded({Metric.VALIDATION_AGREEMENT_ADAROUND: rounding.agreement["adaround"],
                                             Metric.VALIDATION_AGREEMENT_NEAREST: rounding.agreement["nearest"]}))
            records.set_tags({Tag.ROUNDING_CHOICE: rounding.summary()})
        if result.spec != asked:
            records.log_json(qconfig_document(result.spec), Artifact.QCONFIG)  # what the model file holds

    def _stop_on_tracking_failure(self, spec: VariantSpec, exc: Exception) -> None:
        """A variant that failed because the tracking store did is no failed variant: the store is gone or refuses
        records for every variant after it too. Raises TrackingError (one line; --resume picks up the variants
        that finished) when `exc` is or comes from a tracking failure."""
        stopped = sweep_stopped_by_tracking(exc, f"recording {spec.name}", self.stop_hint)
        if stopped is not None:
            raise stopped from exc

    def _run_recorded(self, spec: VariantSpec, outcome: VariantOutcome, parent_run_id: str) -> VariantOutcome:
        """_quantize_and_log inside the variant's run, with a refusal or failure tagged on that run (and re-raised)."""
        try:
            return self._quantize_and_log(spec, outcome, parent_run_id)
        except UnsupportedVariant as exc:
            outcome.status, outcome.reason = "unsupported", exc.reason
            records.set_tags({Tag.STATUS: Tag.STATUS_UNSUPPORTED, Tag.REASON: exc.reason})
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            outcome.reason = failure_reason(exc)
            records.set_tags({Tag.STATUS: Tag.STATUS_FAILED, Tag.REASON: outcome.reason[:5000]})
            raise

    def _quantize_and_log(self, spec: VariantSpec, outcome: VariantOutcome, parent_run_id: str) -> VariantOutcome:
        """Run the variant with the runner, its model kept as the run's MLflow logged model, and log the result."""
        A, M, T, recorder = Artifact, Metric, Tag, self.recorder
        input_key = self.input_key(spec)
        records.set_tags({**recorder.common_tags(parent_run_id), T.INPUT_KEY: input_key})
        records.log_params(recorder.variant_params(spec))
        recorder.log_datasets()
        records.log_json(qconfig_document(spec), A.QCONFIG)
        logged = {}

        def store(model):
            logged["model"] = recorder.log_model(model)
            return logged["model"].model_file

        result = self.runner.run(spec, store=store)
        outcome = VariantOutcome.of(result, run_id=outcome.run_id, input_key=input_key,
                                    model_uri=logged["model"].model_uri,
                                    model_file_in_artifacts=logged["model"].model_file_in_model)
        # the model's own float layers (with the held-out choice's config): the speed check's and fbgemm's
        # saturating depthwise layers, found by quantizing
        outcome.int8_mac_share = recorder.log_int8_mac_share(result.spec, tuple(result.kept_float))
        optional = ((T.QUANTIZED_ENGINE, result.quantized_engine), (T.ORT_GRAPH_SHA256, result.ort_graph_sha256),
                    (T.SCORES_FROM, result.scores_from),
                    (T.KEPT_FLOAT, "; ".join(f"{name}: {why}" for name, why in result.kept_float.items())[:5000]),
                    (T.ENGINE_DEPARTURES, describe_departures(result.engine_departures)[:5000]),
                    (T.FUSION_FALLBACK, result.fusion_fallback))
        records.set_tags({**{key: value for key, value in optional if value}, T.MODEL_FILE_SHA256: result.model_sha256,
                          T.MODEL_FILE_IN_MODEL: outcome.model_file_in_artifacts})
        records.log_file(result.model_file, A.MODEL_FILE_DIR)
        records.log_json(result.evaluation.per_class_accuracy, A.PER_CLASS_ACCURACY)
        self._log_confusion_matrix(outcome.run_id, spec.name, result.evaluation)
        # Accuracy and agreement before the timings: the Models tab lists a logged model's metrics (columns and
        # charts) in the order they were logged.
        recorder.log_metrics({
            M.ACCURACY: result.evaluation.accuracy,
            M.ACCURACY_DELTA_PP: 100 * (result.evaluation.accuracy - self.reference.evaluation.accuracy),
            M.TOP1_AGREEMENT: result.fidelity.top1_agreement, M.KL_DIVERGENCE: result.fidelity.kl_divergence,
            M.SQNR_DB: result.fidelity.sqnr_db, M.MODEL_SIZE_BYTES: result.size_bytes,
            M.COMPRESSION_RATIO: self.inputs.model.size_bytes / result.size_bytes,
            M.TEST_IMAGES: len(self.inputs.test), M.CALIBRATION_IMAGES_USED: result.calibration_images})
        if result.bench:
            recorder.log_bench(result.bench, self.reference.bench)
        self._log_held_out_choices(result, asked=spec)  # after the columns the Models tab shows first
        from ptqflow.pipelines.repair.diagnose import log_variant_diagnosis

        log_variant_diagnosis(result, outcome.run_id, plot=lambda function, *args: self.plots.submit(
            outcome.run_id, A.DIAGNOSIS_PLOT, T.DIAGNOSIS_ERROR, function, *args))
        records.set_tags({T.STATUS: T.STATUS_OK})
        return outcome


def sweep_stopped_by_tracking(exc: BaseException, doing: str, hint: str = RESUME_HINT) -> TrackingError | None:
    """The one line a sweep stops with when `exc` is or comes from a failure of the tracking store (while `doing`):
    a store that did not answer gets `hint` (a sweep's: --resume picks up the variants that finished); a refusal that
    already says what to do (a param conflict, refused credentials) stands as it is. None for any other error."""
    failure = runs.tracking_failure(exc)
    if failure is None:
        return None
    if isinstance(failure, TrackingError):
        cause = failure.__cause__
        if hint in str(failure) or cause is None or (
                isinstance(cause, Exception) and refused_credentials(cause) is not None):
            return failure
        return TrackingError(f"{first_line(failure, 300)}; {hint}")
    return TrackingError(f"tracking failed while {doing}: {first_line(failure, 300)}; {hint}")
