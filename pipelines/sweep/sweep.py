"""The sweep: FP32 baseline plus every quantization variant, each an MLflow child run of one parent run.

Inputs (data, calibration set, converted models) are built once and shared by every variant. A variant that fails
ends its own run FAILED and the sweep goes on; the library's refusal of an unsupported configuration is recorded
as such, not as an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from ptqflow.common.errors import ConfigError, ModelError, PtqflowError, failure_reason
from ptqflow.common.files import file_sha256
from ptqflow.common.versions import package_versions
from ptqflow.models.backends.base import UnsupportedVariant
from ptqflow.models.runtime.latency import BenchResult
from ptqflow.models.runtime.machine import cpu_description
from ptqflow.models.graph.onnx_model import OnnxClassifier, load_classifier
from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.data import shapes
from ptqflow.pipelines.data.calibration import indices_digest, stratified_selection
from ptqflow.pipelines.shared.choices import DataFormat, LayoutChoice, Preprocessing
from ptqflow.pipelines.data.dataset import Dataset, Split
from ptqflow.pipelines.data.datasets import load_dataset
from ptqflow.pipelines.variants.evaluation import Evaluation, Fidelity
from ptqflow.pipelines.repair.fallback import (DEFAULT_CANDIDATES, DEFAULT_RANKING_IMAGES, FallbackTarget, SweepFallback,
                                check_options, mixed_params)
from ptqflow.pipelines.data.inputs import DEFAULT_DATA_DIR, DEFAULT_MODEL, ensure_data, ensure_model
from ptqflow.pipelines.shared.names import ONNX_SUFFIX, PYTORCH_SUFFIX, registered_name_for, validate_name
from ptqflow.pipelines.reports.plot_worker import PendingPlot, PlotWorker
from ptqflow.pipelines.data.preprocessing import InputTransform, parse_values
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.registry.gate import GatePolicy
from ptqflow.pipelines.registry.registrar import MeasuredOn, Registrar, check_registry_targets
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.runner import ModelToStore, RunnerOptions, VariantResult, VariantRunner
from ptqflow.pipelines.variants.specs import (DEFAULT_VARIANTS, FP32, ONNXRUNTIME, PYTORCH, VariantSpec, config_payload,
                                qconfig_document, select)
from ptqflow.tracking import experiments
from ptqflow.tracking import logged_models
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import DEFAULT_EXPERIMENT, Artifact, Metric, Param, Tag

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FP32_AGREEMENT_WARNING = 0.999  # torch vs ORT FP32 top-1 agreement below this is tagged as a warning
TRACKED_PACKAGES = ("ptqflow", "torch", "onnx", "onnxruntime", "onnx2torch", "mlflow", "numpy")


@dataclass(frozen=True)
class SweepOptions:
    model_path: Path = DEFAULT_MODEL
    data_dir: Path = DEFAULT_DATA_DIR
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    experiment: str = DEFAULT_EXPERIMENT
    # None: `<model file stem>-int8` / `<stem>-int8-onnx`, and only for versions of this FP32 model
    registered_model: str | None = None
    registered_onnx_model: str | None = None
    register: bool = True
    calibration_size: int = 1000
    calibration_seed: int = 0
    test_limit: int | None = None
    input_layout: LayoutChoice = LayoutChoice.auto
    preprocessing: Preprocessing = Preprocessing.raw
    data_format: DataFormat = DataFormat.auto  # detected from what data_dir holds (ptqflow.pipelines.data.datasets)
    input_size: tuple[int, int] | None = None  # (height, width) for a model whose input size is dynamic ("HxW" too)
    resize: bool = False  # resize images of another size to the model's (bilinear)
    mean: tuple[float, ...] | None = None  # per channel, after the preprocessing's scaling ("a,b,c" too)
    std: tuple[float, ...] | None = None
    ort_per_channel: bool | None = None
    ort_calibration_method: str | None = None
    run_name: str | None = None
    gate: GatePolicy = GatePolicy()  # when a new registry version takes the champion alias
    weight_rounding: str | None = None  # override every variant's weight rounding (adaround or nearest)
    adaround_iterations: int = 1000  # optimization steps per layer
    resume: bool = False  # reuse finished variant runs with identical inputs instead of recomputing them
    bench: bool = True  # measure latency and throughput of every variant
    fetch_missing: bool = True  # fetch the default model/data paths when they are missing
    cifar10_url: str | None = None  # mirrors for that fetch; None = the pinned official URLs
    resnet8_url: str | None = None
    cifar10_md5: str | None = None  # for a mirror holding another copy of the archive
    # Per-layer diagnosis of every int8 variant on the first N test images, logged on its run (ptqflow.pipelines.repair.diagnose)
    diagnose: bool = True
    diagnose_images: int = 256
    # Sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback): a variant that misses the target gets a `<variant>-mixed`
    target_agreement: float | None = None  # least top-1 agreement with FP32, e.g. 0.995
    max_drop_pp: float | None = None  # most accuracy points below FP32
    ranking_images: int = DEFAULT_RANKING_IMAGES  # the first N test images rank the candidate layers
    fallback_candidates: int = DEFAULT_CANDIDATES  # layers ranked (worst local SQNR, plus any with a hint)

    def __post_init__(self):
        validate_name("--experiment", self.experiment)
        for kind, value in (("--registered-model", self.registered_model),
                            ("--registered-onnx-model", self.registered_onnx_model)):
            if value:  # empty when the command registers no model of that kind
                validate_name(kind, value)
        if self.test_limit is not None and self.test_limit < 0:
            raise ConfigError(f"--test-limit must be positive (0 = all), got {self.test_limit}")
        # The CLI's text forms are accepted too: "48x48", "0.5,0.5,0.5", "npz", "nchw".
        for option, choice in (("data_format", DataFormat), ("input_layout", LayoutChoice),
                               ("preprocessing", Preprocessing)):
            object.__setattr__(self, option, _choice(choice, getattr(self, option), option))
        if isinstance(self.input_size, str):
            object.__setattr__(self, "input_size", shapes.parse_size(self.input_size))
        for option, value in (("mean", self.mean), ("std", self.std)):
            if isinstance(value, str):
                object.__setattr__(self, option, parse_values(f"--{option}", value))
            elif value is not None:
                object.__setattr__(self, option, tuple(float(v) for v in value))
        InputTransform("NCHW", self.preprocessing, self.mean, self.std)  # --mean/--std checked before any loading
        # bad --target-agreement, --max-drop, ... are one line before anything loads
        check_options(self.fallback_target(), self.diagnose_images, self.ranking_images, self.fallback_candidates)

    def fallback_target(self) -> FallbackTarget:
        return FallbackTarget(self.target_agreement, self.max_drop_pp)

    def registered_names(self) -> dict[str, tuple[str, bool]]:
        """Framework → (registered model name, whether the user named it explicitly)."""
        return {framework: (explicit, True) if explicit else (registered_name_for(self.model_path, suffix), False)
                for framework, explicit, suffix in ((PYTORCH, self.registered_model, PYTORCH_SUFFIX),
                                                    (ONNXRUNTIME, self.registered_onnx_model, ONNX_SUFFIX))}

    def specs(self) -> list[VariantSpec]:
        """The variants to run, with the ONNX Runtime and weight-rounding overrides applied."""
        return select(self.variants, self.ort_per_channel, self.ort_calibration_method, self.weight_rounding)

    def runner_options(self) -> RunnerOptions:
        return RunnerOptions(bench=self.bench, adaround_iterations=self.adaround_iterations,
                             diagnose_images=self.diagnose_images if self.diagnose else 0)


def _choice(enum, value, option: str):
    """`value` as a member of `enum`, also from its value in any case ("nchw" for LayoutChoice.nchw)."""
    if isinstance(value, enum):
        return value
    for member in enum:
        if str(value).lower() in (member.value.lower(), member.name.lower()):
            return member
    raise ConfigError(f"--{option.replace('_', '-')} {value!r} is not one of {', '.join(m.value for m in enum)}")


@dataclass(frozen=True)
class SweepInputs:
    """Everything loaded and derived once per sweep."""

    data: Dataset
    model: OnnxClassifier
    transform: InputTransform
    calibration_indices: np.ndarray
    calibration: np.ndarray  # model-ready float32
    test: Split  # at the model's input size (resized with --resize)
    shape: shapes.ModelInput | None = None  # how the data reaches the model (layout, channels, size, resizing)
    calibration_note: str | None = None  # classes that gave fewer calibration images than their share

    @property
    def calibration_digest(self) -> str:
        return indices_digest(self.calibration_indices)

    def input_params(self) -> dict:
        """Data format, class count, input size, resizing and mean/std: params of the parent and every variant."""
        return shapes.input_params(self.data, self.shape, self.transform) if self.shape else {}

    def input_tags(self) -> dict[str, str]:
        return {Tag.CALIBRATION_SHORTFALL: self.calibration_note} if self.calibration_note else {}


def prepare_inputs(options: SweepOptions) -> SweepInputs:
    """Load and validate model and data, check that they fit each other, build the calibration set. Raises
    PtqflowError on bad input, before any run starts."""
    model = load_classifier(ensure_model(options.model_path, options.fetch_missing, options.resnet8_url))
    if model.input.batch_size not in (None, 1):
        raise ModelError(f"{model.path}: the input's batch dimension is fixed at {model.input.batch_size}; ptqflow "
                         "runs models with a dynamic batch dimension or a batch of 1: re-export the model with one")
    data = load_dataset(ensure_data(options.data_dir, options.fetch_missing, options.cifar10_url,
                                    options.cifar10_md5), options.data_format)
    shape = shapes.resolve_model_input(model.input, data, options.input_layout, options.input_size, options.resize)
    transform = InputTransform(shape.layout, options.preprocessing, options.mean, options.std)
    transform.check_channels(shape.channels)
    test = shape.fit(data.test.head(options.test_limit or None))
    shapes.check_class_count(model, data, transform(test.images[:1]))
    inputs = SweepInputs(data=data, model=model, transform=transform, calibration_indices=np.array([], np.int64),
                         calibration=np.zeros((0,), np.float32), test=test, shape=shape)
    if not options.variants:  # an FP32 baseline needs no calibration set
        return inputs
    return with_calibration(inputs, options.calibration_size, options.calibration_seed)


def with_calibration(inputs: SweepInputs, size: int, seed: int) -> SweepInputs:
    """`inputs` with the calibration set `size` images drawn stratified by class from the training split with
    `seed` (the rest is shared: nothing is loaded again)."""
    data = inputs.data
    if size > len(data.train):
        raise ConfigError(f"--calibration-size {size} exceeds the {len(data.train)} training images; pass a "
                          "smaller --calibration-size")
    selection = stratified_selection(data.train.labels, size, seed, data.num_classes)
    note = selection.note(data.class_names)
    if note:
        say(f"[yellow]![/] {note}")
    images = inputs.shape.fit_images(data.train.images[selection.indices])
    return replace(inputs, calibration_indices=selection.indices, calibration=inputs.transform(images),
                   calibration_note=note)


@dataclass
class VariantOutcome(VariantResult):
    """A variant's result (ptqflow.pipelines.variants.runner) and where the sweep recorded it."""

    run_id: str = ""
    input_key: str | None = None  # Sweep.input_key of its spec, set once the variant runs or is reused
    model_file_in_artifacts: str = ""  # the model file's path inside the logged MLflow model
    model_uri: str = ""  # registers the variant's model: models:/<logged model id> (runs:/<run>/model before)

    @classmethod
    def of(cls, result: VariantResult, **recorded) -> "VariantOutcome":
        return cls(**{f.name: getattr(result, f.name) for f in fields(VariantResult)}, **recorded)


@dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[VariantOutcome]
    rows: list[report.VariantRow]
    registered: list = field(default_factory=list)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    test_images: int = 0  # the number of test images every accuracy and agreement is a share of

    @property
    def failed(self) -> list[VariantOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Sweep:
    """One sweep: owns the parent run and records each variant, made and measured by the VariantRunner, as a child
    run; the Registrar registers the best ones."""

    def __init__(self, options: SweepOptions, inputs: SweepInputs, work_dir: Path, timer: PhaseTimer | None = None):
        self.options = options
        self.inputs = inputs
        self.timer = timer or PhaseTimer()
        self.work_dir = work_dir
        self.runner = VariantRunner(inputs, work_dir, options.runner_options(), self.timer)
        self.registrar = Registrar(options.registered_names(), options.gate, MeasuredOn.of(inputs))
        self.specs = options.specs()
        self.versions = package_versions(TRACKED_PACKAGES)
        self.commit = git_commit()
        self.reference: VariantResult | None = None
        self.parent_run_id: str | None = None
        self.run_tags: dict[str, str] = {}  # more creation tags for every variant run (a tune trial's number)
        self.fallback = SweepFallback(options.fallback_target(), self.runner, options.fallback_candidates,
                                      options.ranking_images, self.timer)
        # Plots are drawn where they are logged, but in run(): a background process draws them while the next
        # variant runs, and they are logged on their (ended) runs once drawn (_log_plots).
        self.plot_worker = PlotWorker(background=False)
        self._pending_plots: list[tuple[str, str, str, PendingPlot]] = []  # (run id, artifact, error tag, plot)

    # ---- shared run metadata -------------------------------------------------------------------------------
    def _common_tags(self, parent_run_id: str | None) -> dict[str, str]:
        cpu_model, cpu_isa = cpu_description()
        tags = {Tag.MODEL_SHA256: self.inputs.model.sha256, Tag.CPU_MODEL: cpu_model, Tag.CPU_INT8_ISA: cpu_isa,
                Tag.DATASET_DIGEST: self.inputs.data.digest,
                Tag.CALIBRATION_DIGEST: self.inputs.calibration_digest, **self.inputs.input_tags(),
                **runs.process_tags(),
                **{Tag.VERSION_PREFIX + k: v for k, v in self.versions.items()}}
        if self.commit:
            tags[Tag.GIT_COMMIT] = self.commit
        if parent_run_id:
            tags[Tag.SWEEP_RUN_ID] = parent_run_id
        return tags

    def _variant_params(self, spec: VariantSpec | None) -> dict:
        P = Param
        common = {P.CALIBRATION_SIZE: len(self.inputs.calibration_indices), P.CALIBRATION_SEED: self.options.calibration_seed,
                  P.INPUT_LAYOUT: self.inputs.transform.layout, P.PREPROCESSING: self.inputs.transform.preprocessing.value,
                  **self.inputs.input_params()}
        if spec is None:
            return {P.VARIANT: FP32, P.FRAMEWORK: ONNXRUNTIME, P.BACKEND: "onnxruntime-cpu",
                    P.WEIGHT_DTYPE: "float32", P.ACTIVATION_DTYPE: "float32", P.QUANT_FORMAT: "none",
                    P.PER_CHANNEL: False, P.CALIBRATION_METHOD: "none", P.WEIGHT_ROUNDING: "none",
                    P.QCONFIG: "none (FP32 reference)", **common}
        return {P.VARIANT: spec.name, P.FRAMEWORK: spec.framework, P.BACKEND: spec.config.backend,
                P.WEIGHT_DTYPE: spec.weight_dtype, P.ACTIVATION_DTYPE: spec.activation_dtype,
                P.QUANT_FORMAT: spec.quant_format, P.PER_CHANNEL: spec.config.per_channel,
                P.CALIBRATION_METHOD: spec.calibration_method, P.WEIGHT_ROUNDING: spec.config.weight_rounding,
                P.QCONFIG: spec.config.qconfig_summary(), **mixed_params(spec), **common}

    def _log_datasets(self, train: bool = False) -> None:
        """The test set as an MLflow dataset input of the active run (and, with `train`, the training set the
        calibration images come from), named after the dataset, with its source and digest."""
        data, source = self.inputs.data, str(self.inputs.data.root.resolve())
        tags = {"format": data.format, "classes": str(data.num_classes)}
        records.log_dataset(self.inputs.test.images, self.inputs.test.labels, source, f"{data.name}-test",
                            data.digest, Artifact.DATASET_CONTEXT_TEST, tags)
        if train:
            records.log_dataset(data.train.images, data.train.labels, source, f"{data.name}-train", data.digest,
                                Artifact.DATASET_CONTEXT_TRAIN, tags)

    # ---- FP32 reference ------------------------------------------------------------------------------------
    def run_fp32(self, experiment_id: str, parent_run_id: str) -> VariantOutcome:
        with runs.run_scope(experiment_id, FP32, parent_run_id=parent_run_id,
                            tags={Tag.ROLE: Tag.ROLE_VARIANT, Tag.VARIANT: FP32, **self.run_tags}) as run_id:
            records.set_tags(self._common_tags(parent_run_id))
            records.log_params(self._variant_params(None))
            self._log_datasets()
            reference = self.reference = self.runner.run_reference()
            evaluation, torch_agreement = reference.evaluation, reference.torch_agreement
            if torch_agreement < FP32_AGREEMENT_WARNING:
                records.set_tags({Tag.WARNING: f"{Tag.WARNING_FP32_MISMATCH}: onnx2torch and onnxruntime "
                                               f"agree on {100 * torch_agreement:.2f}% of top-1 on the first "
                                               f"{reference.torch_check_images} test images"})
            float_model = self.runner.float_model
            with tempfile.TemporaryDirectory(dir=self.work_dir) as d:
                # An MLflow logged model linked to this run: the metrics logged below are attached to it too.
                logged = logged_models.log_onnx_model(float_model.onnx.path, FP32, Path(d) / "mlflow_model",
                                                      self.runner.example_input, evaluation.scores[:1],
                                                      self._onnx_requirements(), self._variant_params(None))
                records.set_tags({Tag.MODEL_FILE_SHA256: file_sha256(logged.model_file),
                                  Tag.MODEL_FILE_IN_MODEL: logged.model_file_in_model})
            records.log_file(self.inputs.model.path, Artifact.MODEL_FILE_DIR)
            for relative in self.inputs.model.external_files:  # the .onnx alone would be a model without weights
                records.log_file(self.inputs.model.path.parent / relative,
                                 (Path(Artifact.MODEL_FILE_DIR) / relative.parent).as_posix())
            records.log_json({"variant": FP32, "note": "FP32 reference, no quantization"}, Artifact.QCONFIG)
            records.log_json(evaluation.per_class_accuracy, Artifact.PER_CLASS_ACCURACY)
            self._log_confusion_matrix(run_id, FP32, evaluation)
            self._log_metrics({
                Metric.ACCURACY: evaluation.accuracy, Metric.ACCURACY_DELTA_PP: 0.0,
                Metric.TOP1_AGREEMENT: 1.0, Metric.KL_DIVERGENCE: 0.0,
                Metric.MODEL_SIZE_BYTES: self.inputs.model.size_bytes, Metric.COMPRESSION_RATIO: 1.0,
                Metric.TORCH_ORT_AGREEMENT: torch_agreement, Metric.TORCH_ORT_IMAGES: reference.torch_check_images,
                Metric.TEST_IMAGES: len(self.inputs.test)})
            if reference.bench:
                self._log_bench(reference.bench)
            records.set_tags({Tag.STATUS: Tag.STATUS_OK})
        say(f"[green]✓[/] fp32: accuracy {100 * evaluation.accuracy:.2f}% (onnx2torch agrees on "
            f"{100 * torch_agreement:.2f}% of the first {reference.torch_check_images})")
        return VariantOutcome.of(reference, run_id=run_id, model_uri=logged.model_uri)

    def _log_bench(self, bench: BenchResult, ended_run: VariantOutcome | None = None) -> None:
        """Timings, speedups over FP32 named by batch size, and their spread; a spread above CONTENDED_SPREAD sets
        the contended metric to 1 and tags the run with why its timings are not facts. On the active run, or on
        `ended_run`'s run and logged model (timed after its run ended: _bench_together)."""
        from ptqflow.models.runtime.latency import CONTENDED_SPREAD

        M = Metric
        metrics = {M.LATENCY_MS_B1_P50: bench.latency_ms_b1_p50, M.LATENCY_MS_B1_P90: bench.latency_ms_b1_p90,
                   M.THROUGHPUT_IPS_B256: bench.throughput_ips_b256, M.SPREAD_B1: bench.spread_b1,
                   M.SPREAD_B256: bench.spread_b256, M.BENCH_CONTENDED: int(bench.contended),
                   M.SPEEDUP_VS_FP32_B1: _speedup_b1(bench, self.reference.bench),
                   M.SPEEDUP_VS_FP32_B256: _speedup_b256(bench, self.reference.bench)}
        if bench.reference is not None:  # timed in rounds beside FP32: the FP32 side and the ratios' range
            b1, b256 = bench.speedup_b1_range or (None, None), bench.speedup_b256_range or (None, None)
            metrics.update({M.FP32_LATENCY_MS_B1_P50: bench.reference.latency_ms_b1_p50,
                            M.FP32_THROUGHPUT_IPS_B256: bench.reference.throughput_ips_b256,
                            M.SPEEDUP_VS_FP32_B1_MIN: b1[0], M.SPEEDUP_VS_FP32_B1_MAX: b1[1],
                            M.SPEEDUP_VS_FP32_B256_MIN: b256[0], M.SPEEDUP_VS_FP32_B256_MAX: b256[1]})
        metrics = precision.rounded(metrics, len(self.inputs.test))  # None values (a range not measured) dropped
        params = {Param.BENCH_THREADS: bench.threads, Param.BENCH_ROUNDS: bench.rounds}
        tags = {}
        if bench.contended:
            spreads = ", ".join(f"{name} p90/p50 {value:.2f}" for name, value in
                                (("batch-1", bench.spread_b1), ("batch-256", bench.spread_b256)) if value is not None)
            tags[Tag.BENCH_CONTENDED] = (f"{spreads}: above {CONTENDED_SPREAD:g}, the machine was busy while timing; "
                                         "latency and throughput are not measurements of the model")
        if ended_run is not None:
            records.log_to_ended_run(ended_run.run_id, ended_run.model_uri, metrics, params, tags)
            return
        records.log_metrics(metrics)
        records.log_params(params)
        if tags:
            records.set_tags(tags)

    def _bench_together(self, outcomes: list[VariantOutcome]) -> None:
        """Time FP32 and every model this sweep made in shared rounds (VariantRunner.bench_together): each round
        times FP32 once, then each variant, so every ratio is against FP32 timed seconds before it, and FP32 is
        not timed again for each variant. Their runs have ended by now; the numbers go on each run and its logged
        model. Reused runs keep the timings they were logged with."""
        reference, made = outcomes[0], [o for o in outcomes[1:]
                                        if o.status == "ok" and o.bench is None and o.model_file is not None]
        timed = self.runner.bench_together([(o.name, o.model_file, o.quantized_engine) for o in made])
        self.reference.bench = timed.results[FP32]
        for outcome in [reference, *made]:
            if outcome.name in timed.failed:
                say(f"[yellow]![/] {outcome.name}: not timed ({timed.failed[outcome.name]})")
                records.set_run_tags(outcome.run_id, {Tag.WARNING: f"not timed: {timed.failed[outcome.name]}"[:5000]})
                continue
            outcome.bench = timed.results[outcome.name]
            self._log_bench(outcome.bench, ended_run=outcome)

    def _log_metrics(self, metrics: dict) -> None:
        """Log on the active run, each metric rounded to its precision (ptqflow.pipelines.shared.precision)."""
        records.log_metrics(precision.rounded(metrics, len(self.inputs.test)))

    def _log_confusion_matrix(self, run_id: str, name: str, evaluation: Evaluation) -> None:
        self._plot(run_id, Artifact.CONFUSION_MATRIX, Tag.WARNING, plots.confusion_matrix, self.inputs.test.labels,
                   evaluation.predictions, self.inputs.data.class_names,
                   f"{name}: confusion matrix ({len(self.inputs.test)} test images)")

    def _plot(self, run_id: str, artifact: str, error_tag: str, function, *args) -> None:
        """Draw `function(*args)` (a PNG) as `artifact` of run `run_id`: now, or in the background plot worker
        and logged by _log_plots. A plot that cannot be drawn is tagged `error_tag` on the run, never its
        failure."""
        pending = self.plot_worker.submit(function, *args)
        self._pending_plots.append((run_id, artifact, error_tag, pending))
        if not self.plot_worker.background:
            self._log_plots()

    def _log_plots_if_possible(self) -> None:
        """After an error or a stop, the plots of the runs that ended before it, where they can still be logged
        (the worker ignores Ctrl-C, so it finishes drawing them)."""
        try:
            self._log_plots()
        except Exception:  # noqa: BLE001 - the error that stopped the sweep is the one to report
            self._pending_plots = []

    def _log_plots(self, upto: int | None = None) -> None:
        """Wait for the plots submitted (the first `upto` of them, else all) and log each on its run."""
        count = len(self._pending_plots) if upto is None else upto
        done, self._pending_plots = self._pending_plots[:count], self._pending_plots[count:]
        for run_id, artifact, error_tag, pending in done:
            try:
                png = pending.result()
            except Exception as exc:  # noqa: BLE001 - the run's numbers stand without the picture
                records.set_run_tags(run_id, {error_tag: f"{artifact}: {failure_reason(exc)}"[:5000]})
                continue
            records.log_bytes_to_run(run_id, png, artifact)

    def _onnx_requirements(self) -> list[str]:
        return [f"onnx=={self.versions['onnx']}", f"onnxruntime=={self.versions['onnxruntime']}",
                f"numpy=={self.versions['numpy']}"]

    # ---- one variant ---------------------------------------------------------------------------------------
    def input_key(self, spec: VariantSpec) -> str:
        """SHA-256 of everything that determines a variant's result: same key, same numbers."""
        payload = {"model_sha256": self.inputs.model.sha256, "dataset_sha256": self.inputs.data.digest,
                   "calibration_sha256": self.inputs.calibration_digest, "variant": spec.name,
                   "config": config_payload(spec.config), "test_images": len(self.inputs.test),
                   "layout": self.inputs.transform.layout, "preprocessing": self.inputs.transform.preprocessing.value,
                   "inputs": self.inputs.input_params(),  # data format, classes, size, resizing, mean/std
                   "bench": self.options.bench, "adaround_iterations": self.options.adaround_iterations,
                   "versions": {k: self.versions[k] for k in ("torch", "onnxruntime", "onnx2torch", "onnx")},
                   # ptqflow's own code: after a fix, an old run is not "the same"
                   "ptqflow": {"version": self.versions["ptqflow"], "git_commit": self.commit}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _reuse(self, spec: VariantSpec, run) -> VariantOutcome:
        say(f"[green]↺[/] {spec.name}: reused finished run {run.info.run_id} (same inputs)")
        return self.outcome_of_run(spec, run)

    def outcome_of_run(self, spec: VariantSpec, run) -> VariantOutcome:
        """`spec`'s outcome as a finished variant run recorded it (what --resume reuses, what tune registers)."""
        from ptqflow.tracking.recovery import load_json_artifact

        M, T = Metric, Tag
        m, tags = run.data.metrics, run.data.tags
        bench = None
        if M.LATENCY_MS_B1_P50 in m:
            bench = BenchResult(m[M.LATENCY_MS_B1_P50], m[M.LATENCY_MS_B1_P90], m.get(M.THROUGHPUT_IPS_B256),
                                int(run.data.params.get(Param.BENCH_THREADS, 0)), m.get(M.SPREAD_B256),
                                rounds=int(run.data.params.get(Param.BENCH_ROUNDS, 1)),
                                speedup_b1=m.get(M.SPEEDUP_VS_FP32_B1), speedup_b256=m.get(M.SPEEDUP_VS_FP32_B256))
        per_class = load_json_artifact(run.info.run_id, Artifact.PER_CLASS_ACCURACY)
        return VariantOutcome(
            spec.name, spec.framework, spec, run_id=run.info.run_id, input_key=tags.get(T.INPUT_KEY),
            evaluation=Evaluation(m[M.ACCURACY], per_class, None, None),
            fidelity=Fidelity(m[M.TOP1_AGREEMENT], m.get(M.KL_DIVERGENCE, float("nan")), m.get(M.SQNR_DB, float("nan"))),
            model_file_in_artifacts=tags.get(T.MODEL_FILE_IN_MODEL, ""), model_sha256=tags.get(T.MODEL_FILE_SHA256, ""),
            quantized_engine=tags.get(T.QUANTIZED_ENGINE, ""), reason=f"reused run {run.info.run_id[:8]}",
            model_uri=logged_models.logged_model_uri(run) or "",
            bench=bench, size_bytes=int(m[M.MODEL_SIZE_BYTES]))

    def _reusable(self, experiment_id: str, spec: VariantSpec) -> bool:
        """With --resume, whether a finished run of this variant on identical inputs will be reused (it needs no
        AdaRound grid)."""
        if not self.options.resume:
            return False
        from ptqflow.tracking.recovery import find_reusable

        return find_reusable(experiment_id, self.input_key(spec)) is not None

    def run_variant(self, spec: VariantSpec, experiment_id: str, parent_run_id: str) -> VariantOutcome:
        if self.options.resume:
            from ptqflow.tracking.recovery import find_reusable

            previous = find_reusable(experiment_id, self.input_key(spec))
            if previous is not None:
                records.set_tags({Tag.REUSED_FROM + spec.name: previous.info.run_id})
                return self._reuse(spec, previous)
        outcome = VariantOutcome(spec.name, spec.framework, spec, status="failed")
        try:
            with runs.run_scope(experiment_id, spec.name, parent_run_id=parent_run_id,
                                tags={Tag.ROLE: Tag.ROLE_VARIANT, Tag.VARIANT: spec.name, **self.run_tags}) as run_id:
                outcome.run_id = run_id
                try:
                    outcome = self._quantize_and_log(spec, outcome)
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
        except UnsupportedVariant:
            say(f"[yellow]–[/] {spec.name}: unsupported ({outcome.reason})")
            return outcome
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            say(f"[red]✗[/] {spec.name}: failed ({outcome.reason})")
            return outcome
        say(f"[green]✓[/] {spec.name}: accuracy {100 * outcome.evaluation.accuracy:.2f}% "
            f"({100 * (outcome.evaluation.accuracy - self.reference.evaluation.accuracy):+.2f} pp), "
            f"agreement {100 * outcome.fidelity.top1_agreement:.2f}%"
            + (f" (onnxruntime runs it as the same graph as {outcome.scores_from}: its scores)"
               if outcome.scores_from else ""))
        return outcome

    def _quantize_and_log(self, spec: VariantSpec, outcome: VariantOutcome) -> VariantOutcome:
        """Run the variant with the runner, its model kept as the run's MLflow logged model, and log the result."""
        A, M, T = Artifact, Metric, Tag
        input_key = self.input_key(spec)
        records.set_tags({**self._common_tags(self.parent_run_id), T.INPUT_KEY: input_key})
        records.log_params(self._variant_params(spec))
        self._log_datasets()
        records.log_json(qconfig_document(spec), A.QCONFIG)
        logged = {}
        result = self.runner.run(spec, store=lambda model: self._log_model(model, logged))
        outcome = VariantOutcome.of(result, run_id=outcome.run_id, input_key=input_key,
                                    model_uri=logged["model"].model_uri,
                                    model_file_in_artifacts=logged["model"].model_file_in_model)
        if result.quantized_engine:
            records.set_tags({T.QUANTIZED_ENGINE: result.quantized_engine})
        if result.ort_graph_sha256:
            records.set_tags({T.ORT_GRAPH_SHA256: result.ort_graph_sha256})
        if result.scores_from:
            records.set_tags({T.SCORES_FROM: result.scores_from})
        records.set_tags({T.MODEL_FILE_SHA256: result.model_sha256,
                          T.MODEL_FILE_IN_MODEL: outcome.model_file_in_artifacts})
        records.log_file(result.model_file, A.MODEL_FILE_DIR)
        records.log_json(result.evaluation.per_class_accuracy, A.PER_CLASS_ACCURACY)
        self._log_confusion_matrix(outcome.run_id, spec.name, result.evaluation)
        # Accuracy and agreement before the timings: the Models tab lists a logged model's metrics (columns and
        # charts) in the order they were logged.
        self._log_metrics({
            M.ACCURACY: result.evaluation.accuracy,
            M.ACCURACY_DELTA_PP: 100 * (result.evaluation.accuracy - self.reference.evaluation.accuracy),
            M.TOP1_AGREEMENT: result.fidelity.top1_agreement, M.KL_DIVERGENCE: result.fidelity.kl_divergence,
            M.SQNR_DB: result.fidelity.sqnr_db, M.MODEL_SIZE_BYTES: result.size_bytes,
            M.COMPRESSION_RATIO: self.inputs.model.size_bytes / result.size_bytes,
            M.TEST_IMAGES: len(self.inputs.test), M.CALIBRATION_IMAGES_USED: result.calibration_images})
        if result.bench:
            self._log_bench(result.bench)
        from ptqflow.pipelines.repair.diagnose import log_variant_diagnosis

        log_variant_diagnosis(result, outcome.run_id, plot=lambda function, *args: self._plot(
            outcome.run_id, A.DIAGNOSIS_PLOT, T.DIAGNOSIS_ERROR, function, *args))
        records.set_tags({T.STATUS: T.STATUS_OK})
        return outcome

    def _log_model(self, model: ModelToStore, logged: dict) -> Path:
        """The runner's store: the variant's model becomes an MLflow logged model linked to this run (named after
        the variant; the params above and the metrics below are attached to it), then is downloaded back: the file
        evaluated, hashed and registered is byte for byte the one the artifact store holds."""
        spec, params = model.spec, self._variant_params(model.spec)
        model_dir = self.work_dir / spec.name / "mlflow_model"
        if model.module is not None:
            logged["model"] = logged_models.log_torchscript_model(
                model.module, spec.name, model_dir, model.example_input, model.example_output,
                [f"torch=={self.versions['torch']}", f"numpy=={self.versions['numpy']}"], params)
        else:
            logged["model"] = logged_models.log_onnx_model(model.quantized.path, spec.name, model_dir, model.example_input,
                                                           model.example_output, self._onnx_requirements(), params)
        return logged["model"].model_file

    # ---- the whole sweep -----------------------------------------------------------------------------------
    def run_name(self) -> str:
        """The parent run's name, which tells sweeps apart in the runs table: model, start time (local, to the
        second) and number of test images, e.g. `resnet8 · 2026-12-01 23:40:05 · 10000 imgs`."""
        return (f"{self.inputs.model.path.stem[:100]} · {time.strftime('%Y-%m-%d %H:%M:%S')} · "
                f"{len(self.inputs.test)} imgs")

    def run(self) -> SweepResult:
        import mlflow  # only for the active run's experiment under `mlflow run`

        started = time.perf_counter()
        experiment_id = experiments.ensure_experiment(self.options.experiment)
        from ptqflow.tracking.recovery import mark_orphans_failed

        orphans = mark_orphans_failed(experiment_id)
        if orphans:
            say(f"[yellow]![/] marked {len(orphans)} run(s) FAILED whose process on this host had died: "
                f"{', '.join(o[:8] for o in orphans)}")
        run_name = self.options.run_name or self.run_name()
        with runs.run_scope(experiment_id, run_name) as parent_run_id:
            self.parent_run_id = parent_run_id
            experiment_id = mlflow.active_run().info.experiment_id  # `mlflow run` may have chosen another one
            experiments.mark_experiment(experiment_id)  # opens as a "Model training" experiment with ptqflow's columns
            records.set_tags({Tag.ROLE: Tag.ROLE_SWEEP, **self._common_tags(None)})
            P = Param
            records.log_params({P.MODEL_PATH: str(self.options.model_path), P.DATA_DIR: str(self.options.data_dir),
                                     P.VARIANTS: ",".join(s.name for s in self.specs),
                                     P.CALIBRATION_SIZE: len(self.inputs.calibration_indices),
                                     P.CALIBRATION_SEED: self.options.calibration_seed,
                                     P.INPUT_LAYOUT: self.inputs.transform.layout,
                                     P.PREPROCESSING: self.inputs.transform.preprocessing.value,
                                     P.TEST_LIMIT: self.options.test_limit or 0,  # 0 = all, as in MLproject
                                     P.MAX_ACCURACY_DROP_PP: self.options.gate.max_accuracy_drop_pp,
                                     P.MIN_AGREEMENT: self.options.gate.min_agreement,
                                     P.ADAROUND_ITERATIONS: self.options.adaround_iterations,
                                     **self.inputs.input_params()})
            self._log_datasets(train=True)
            records.log_json({"indices": self.inputs.calibration_indices.tolist(),
                                   "sha256": self.inputs.calibration_digest}, Artifact.CALIBRATION_INDICES)
            self.runner.convert(self.specs, reference_meanwhile=True)
            # Every model is timed at the end, together with FP32 (_bench_together), not each in its own run.
            bench = self.runner.options.bench
            self.runner.options = replace(self.runner.options, bench=False)
            with PlotWorker() as self.plot_worker:
                try:
                    if self.specs:
                        records.log_params({P.BATCHNORMS_FOLDED: self.runner.quantization_source.folded_batch_norms})
                    if self.fallback.target.active:
                        records.log_params({key: value for key, value in (
                               (P.TARGET_AGREEMENT, self.options.target_agreement),
                               (P.TARGET_MAX_DROP_PP, self.options.max_drop_pp)) if value is not None})
                    outcomes = [self.run_fp32(experiment_id, parent_run_id)]
                    self.runner.adaround_ahead([spec for spec in self.specs
                                                if not self._reusable(experiment_id, spec)])
                    for spec in self.specs:
                        drawing = len(self._pending_plots)  # the plots before this variant: drawn while it runs
                        outcomes.append(self.run_variant(spec, experiment_id, parent_run_id))
                        self._log_plots(upto=drawing)
                        mixed = self.fallback.repair(outcomes[-1])  # None unless it missed the target
                        if mixed is not None:
                            outcomes.append(self.run_variant(mixed, experiment_id, parent_run_id))
                    self._log_plots()  # all drawn before the timing starts, so nothing else runs then
                    if bench:
                        self._bench_together(outcomes)
                    rows = [self._row(o) for o in outcomes]
                    # the sweep's own plots are drawn while the best variants are registered and the tables logged
                    from ptqflow.pipelines.repair.diagnose import log_backend_comparison

                    log_backend_comparison(outcomes, len(self.inputs.test), plot=lambda function, *args: self._plot(
                        parent_run_id, Artifact.DIAGNOSIS_BACKENDS_PLOT, Tag.DIAGNOSIS_ERROR, function, *args))
                    self._log_sweep_plots(parent_run_id, outcomes, rows)
                    with self.timer.phase("register"):
                        registered = (self.registrar.register_best(outcomes, self.reference.evaluation.accuracy)
                                      if self.options.register else [])
                    title = (f"{self.inputs.model.path.name} on {len(self.inputs.test)} {self.inputs.data.title} "
                             "test images")
                    records.log_text(report.to_markdown(rows, title), Artifact.COMPARISON_MD)
                    records.log_text(report.to_csv(rows), Artifact.COMPARISON_CSV)
                    records.log_text(report.to_html(rows, title,
                                                    run_url=lambda run_id: self._run_url(experiment_id, run_id),
                                                    champions=self._champions(experiment_id)),
                                     Artifact.COMPARISON_HTML)
                    self._log_plots()
                except BaseException:  # Ctrl-C too: the runs that ended keep their plots (a second or two)
                    self.runner.stop_reference()  # failed before the FP32 run took them: not left computing scores
                    self._log_plots_if_possible()
                    raise
            self.plot_worker = PlotWorker(background=False)
            seconds = time.perf_counter() - started
            self._log_summary(outcomes, seconds)
            say(f"MLflow UI (Model training view, ptqflow's columns): {experiments.experiment_page(experiment_id)}")
            result = SweepResult(parent_run_id, outcomes, rows, registered, seconds,
                                 test_images=len(self.inputs.test))
            if result.failed:
                raise VariantsFailed(result)
        return result

    def _log_sweep_plots(self, run_id: str, outcomes: list[VariantOutcome], rows: list[report.VariantRow]) -> None:
        A = Artifact
        latency = {r.variant: r.latency_ms_b1_p50 for r in rows if r.latency_ms_b1_p50 is not None}
        contended = {r.variant for r in rows if r.contended}
        per_class = {o.name: o.evaluation.per_class_accuracy for o in outcomes if o.evaluation}
        for artifact, function, *args in (
                (A.PLOT_ACCURACY_VS_SIZE, plots.accuracy_vs_size, rows),
                (A.PLOT_ACCURACY_VS_LATENCY, plots.accuracy_vs_latency, rows, latency, contended),
                (A.PLOT_PER_CLASS, plots.per_class_accuracy, per_class),
                (A.PLOT_AGREEMENT, plots.agreement, rows, self.options.gate.min_agreement)):
            self._plot(run_id, artifact, Tag.WARNING, function, *args)

    @staticmethod
    def _run_url(experiment_id: str, run_id: str) -> str:
        """The run's page in the MLflow UI: on the tracking server when it is one (without credentials), else
        where `mlflow ui` serves a local store by default (ptqflow.tracking.experiments.ui_base_url)."""
        return f"{experiments.ui_base_url()}#/experiments/{experiment_id}/runs/{run_id}"

    def _champions(self, experiment_id: str) -> list[tuple[report.Champion, str]]:
        """Each registered model's @champion after this sweep's gate, with a link to its run; empty when nothing was
        registered."""
        return self.registrar.champions(experiment_id, self._run_url) if self.options.register else []

    def _log_summary(self, outcomes: list[VariantOutcome], seconds: float) -> None:
        M = Metric
        quantized = [o for o in outcomes if o.status == "ok" and o.name != FP32]
        summary = {M.VARIANTS_OK: len(quantized), M.VARIANTS_FAILED: sum(o.status == "failed" for o in outcomes),
                   M.VARIANTS_UNSUPPORTED: sum(o.status == "unsupported" for o in outcomes),
                   M.ACCURACY: self.reference.evaluation.accuracy, M.SWEEP_SECONDS: seconds}
        if quantized:
            summary[M.BEST_INT8_ACCURACY] = max(o.evaluation.accuracy for o in quantized)
            summary[M.BEST_INT8_AGREEMENT] = max(o.fidelity.top1_agreement for o in quantized)
        self._log_metrics(summary)

    def _row(self, o: VariantOutcome) -> report.VariantRow:
        params = self._variant_params(o.spec)
        P, reference = Param, self.reference
        size = o.size_bytes or (self.inputs.model.size_bytes if o.name == FP32 else None)
        M, n = Metric, len(self.inputs.test)

        def rounded(key, value):  # as the run's metric records it
            return precision.round_metric(key, value, n)

        return report.VariantRow(
            variant=o.name, framework=params[P.FRAMEWORK], backend=params[P.BACKEND],
            weight_dtype=params[P.WEIGHT_DTYPE], activation_dtype=params[P.ACTIVATION_DTYPE],
            quant_format=params[P.QUANT_FORMAT], per_channel=params[P.PER_CHANNEL],
            calibration_method=params[P.CALIBRATION_METHOD], status=o.status,
            accuracy=rounded(M.ACCURACY, o.evaluation.accuracy) if o.evaluation else None,
            accuracy_delta_pp=(rounded(M.ACCURACY_DELTA_PP,
                                       100 * (o.evaluation.accuracy - reference.evaluation.accuracy))
                               if o.evaluation else None),
            top1_agreement=rounded(M.TOP1_AGREEMENT, o.fidelity.top1_agreement) if o.fidelity else None,
            model_size_bytes=size,
            compression_ratio=rounded(M.COMPRESSION_RATIO, self.inputs.model.size_bytes / size) if size else None,
            reason=o.reason, run_id=o.run_id,
            latency_ms_b1_p50=rounded(M.LATENCY_MS_B1_P50, o.bench.latency_ms_b1_p50) if o.bench else None,
            speedup_b1_vs_fp32=rounded(M.SPEEDUP_VS_FP32_B1, _speedup_b1(o.bench, reference.bench)),
            speedup_b256_vs_fp32=rounded(M.SPEEDUP_VS_FP32_B256, _speedup_b256(o.bench, reference.bench)),
            contended=o.bench.contended if o.bench else None)


def _speedup_b1(bench: BenchResult | None, reference: BenchResult | None) -> float | None:
    """FP32's batch-1 p50 latency over this one: > 1 is faster. A bench timed in rounds beside FP32 carries its
    own (the median of the per-round ratios); otherwise the ratio to the sweep's FP32 run."""
    if bench is not None and bench.speedup_b1 is not None:
        return bench.speedup_b1
    if bench is None or reference is None or not bench.latency_ms_b1_p50:
        return None
    return reference.latency_ms_b1_p50 / bench.latency_ms_b1_p50


def _speedup_b256(bench: BenchResult | None, reference: BenchResult | None) -> float | None:
    """This batch-256 throughput over FP32's: > 1 is faster; None for a model whose batch is fixed at 1. Like
    _speedup_b1, the bench's own per-round ratio first."""
    if bench is not None and bench.speedup_b256 is not None:
        return bench.speedup_b256
    if bench is None or reference is None or not bench.throughput_ips_b256 or not reference.throughput_ips_b256:
        return None
    return bench.throughput_ips_b256 / reference.throughput_ips_b256


class VariantsFailed(PtqflowError):
    """Some variants failed unexpectedly; the others were logged. Ends the parent run FAILED."""

    exit_code = 1

    def __init__(self, result: SweepResult):
        names = ", ".join(f"{o.name} ({o.reason})" for o in result.failed)
        super().__init__(f"{len(result.failed)} variant(s) failed: {names}; the other runs are logged "
                         f"under sweep run {result.parent_run_id}")
        self.result = result


def run_sweep(options: SweepOptions, work_dir: Path | None = None) -> SweepResult:
    """Prepare inputs, then run the sweep in `work_dir` (its files stay: each variant's model file is
    `<work_dir>/<variant>/model.pt` or `model.onnx`), by default a scratch directory removed afterwards."""
    timer = PhaseTimer()
    with timer.phase("load"):
        inputs = prepare_inputs(options)
    if options.register:
        check_registry_targets(options.registered_names(), options.specs(), inputs.model.sha256)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ptqflow-sweep-")))
        result = Sweep(options, inputs, Path(work_dir), timer).run()
    result.phase_seconds = timer.summary()
    return result
