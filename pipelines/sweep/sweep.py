"""The sweep: FP32 baseline plus every quantization variant, each an MLflow child run of one parent run.

Inputs (data, calibration set, converted models) are built once and shared by every variant (sweep.inputs). The
variant runs (sweep.variant_runs) make, measure and record each variant; a variant that fails ends its own run FAILED
and the sweep goes on; the library's refusal of an unsupported configuration is recorded as such, not as an error.
After the variants: every model timed together with FP32, the comparison tables and plots, the best variants
registered through the gate.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ptqflow.models.graph.rewrites import model_opset
from ptqflow.pipelines.registry.registrar import check_registry_targets
from ptqflow.pipelines.repair.sweep_fallback import SweepFallback
from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.inputs import SweepInputs, prepare_inputs
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.outcomes import SweepResult, VariantOutcome, VariantsFailed, comparison_row
from ptqflow.pipelines.sweep.recording import run_url
from ptqflow.pipelines.sweep.variant_runs import VariantRuns, sweep_stopped_by_tracking
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.specs import FP32
from ptqflow.tracking import experiments, records, runs
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag


class Sweep:
    """One sweep: owns the parent run, runs FP32 and every variant (VariantRuns), with the fallback's `-mixed`
    repair of a variant that misses the target, then times, compares and registers them."""

    def __init__(self, options: SweepOptions, inputs: SweepInputs, work_dir: Path, timer: PhaseTimer | None = None):
        self.options = options
        self.inputs = inputs
        self.timer = timer or PhaseTimer()
        self.variants = VariantRuns(options, inputs, work_dir, self.timer)
        self.fallback = SweepFallback(options.fallback_target(), self.variants.runner, options.fallback_candidates,
                                      options.ranking_images, self.timer)

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
        with runs.run_scope(experiment_id, self.options.run_name or self.run_name()) as parent_run_id:
            experiment_id = mlflow.active_run().info.experiment_id  # `mlflow run` may have chosen another one
            self._start_parent(experiment_id)
            self.variants.runner.convert(self.variants.specs, reference_meanwhile=True)
            # Every model is timed at the end, together with FP32 (_bench_together), not each in its own run.
            bench = self.variants.runner.options.bench
            self.variants.runner.options = replace(self.variants.runner.options, bench=False)
            with self.variants.plots.drawing_in_background():
                try:
                    outcomes = self._run_variants(experiment_id, parent_run_id)
                    if bench:
                        # the plot worker drawing beside the timings took a core from them: ResNet8's ort-int8
                        # timed 0.113 ms at batch 1 with it, 0.057 ms alone
                        self.variants.plots.log()
                        self._bench_together(outcomes)
                    rows, registered = self._conclude(experiment_id, parent_run_id, outcomes)
                except BaseException as exc:  # Ctrl-C too: the runs that ended keep their plots (a second or two)
                    self.variants.runner.stop_reference()  # failed before the FP32 run took them: not left computing scores
                    self.variants.plots.log_if_possible()
                    stopped = sweep_stopped_by_tracking(exc, "logging the sweep's records")
                    if stopped is not None and stopped is not exc:
                        raise stopped from exc
                    raise
            seconds = time.perf_counter() - started
            self._log_summary(outcomes, seconds)
            say(f"MLflow UI (Model training view, ptqflow's columns): {experiments.experiment_page(experiment_id)}")
            result = SweepResult(parent_run_id, outcomes, rows, registered, seconds,
                                 test_images=len(self.inputs.test))
            if result.failed:
                raise VariantsFailed(result)
        return result

    def _start_parent(self, experiment_id: str) -> None:
        """The parent run's tags, params, datasets and calibration indices."""
        P, options, inputs = Param, self.options, self.inputs
        experiments.mark_experiment(experiment_id)  # opens as a "Model training" experiment with ptqflow's columns
        records.set_tags({Tag.ROLE: Tag.ROLE_SWEEP, **self.variants.recorder.common_tags(None)})
        records.log_params({P.MODEL_PATH: str(options.model_path), P.DATA_DIR: str(options.data_dir),
                            P.VARIANTS: ",".join(s.name for s in self.variants.specs),
                            P.CALIBRATION_SIZE: len(inputs.calibration_indices),
                            P.CALIBRATION_SEED: options.calibration_seed,
                            P.VALIDATION_SIZE: len(inputs.validation_indices),
                            P.INPUT_LAYOUT: inputs.transform.layout,
                            P.PREPROCESSING: inputs.transform.preprocessing.value,
                            P.TEST_LIMIT: options.test_limit or 0,  # 0 = all, as in MLproject
                            P.MAX_ACCURACY_DROP_PP: options.gate.max_accuracy_drop_pp,
                            P.MIN_AGREEMENT: options.gate.min_agreement,
                            P.ADAROUND_ITERATIONS: options.adaround_iterations,
                            **inputs.input_params()})
        self.variants.recorder.log_datasets(train=True)
        records.log_json({"indices": inputs.calibration_indices.tolist(), "sha256": inputs.calibration_digest},
                         Artifact.CALIBRATION_INDICES)

    def _run_variants(self, experiment_id: str, parent_run_id: str) -> list[VariantOutcome]:
        """FP32, then every variant (and its `-mixed` repair when it misses the fallback target), each plot drawn
        while the next variant runs."""
        P = Param
        if self.variants.specs:
            source = self.variants.runner.quantization_source
            opset = source.upgraded_from_opset or model_opset(source.onnx.proto)
            records.log_params({P.BATCHNORMS_FOLDED: source.folded_batch_norms,
                                P.CHANNEL_CONSTANTS_FOLDED: source.folded_channel_constants, P.MODEL_OPSET: opset,
                                P.QUANTIZATION_OPSET: model_opset(source.onnx.proto)})
        if self.fallback.target.active:
            records.log_params({key: value for key, value in ((P.TARGET_AGREEMENT, self.options.target_agreement),
                                                              (P.TARGET_MAX_DROP_PP, self.options.max_drop_pp))
                                if value is not None})
        outcomes = [self.variants.run_fp32(experiment_id, parent_run_id)]
        self.variants.runner.adaround_ahead([spec for spec in self.variants.specs if self.variants.previous_run(experiment_id, spec) is None])
        for spec in self.variants.specs:
            drawing = len(self.variants.plots)  # the plots before this variant: drawn while it runs
            outcomes.append(self.variants.run_variant(spec, experiment_id, parent_run_id))
            self.variants.plots.log(upto=drawing)
            mixed = self.fallback.repair(outcomes[-1], parent_run_id)  # None unless it missed the target
            if mixed is not None:
                outcomes.append(self.variants.run_variant(mixed, experiment_id, parent_run_id))
        self.variants.plots.log()  # all drawn before the timing starts, so nothing else runs then
        return outcomes

    def _conclude(self, experiment_id: str, parent_run_id: str, outcomes: list[VariantOutcome]):
        """The comparison rows, the sweep's plots (drawn while the best variants are registered), the registered
        versions and the comparison tables. Returns (rows, registered)."""
        rows = [comparison_row(o, self.variants.recorder.variant_params(o.spec), self.variants.reference, self.inputs.model.size_bytes,
                               len(self.inputs.test)) for o in outcomes]
        from ptqflow.pipelines.repair.diagnose import log_backend_comparison

        log_backend_comparison(outcomes, len(self.inputs.test), plot=lambda function, *args: self.variants.plots.submit(
            parent_run_id, Artifact.DIAGNOSIS_BACKENDS_PLOT, Tag.DIAGNOSIS_ERROR, function, *args))
        self._log_sweep_plots(parent_run_id, outcomes, rows)
        with self.timer.phase("register"):
            registered = (self.variants.registrar.register_best(outcomes, self.variants.reference.evaluation.accuracy)
                          if self.options.register else [])
        title = f"{self.inputs.model.path.name} on {len(self.inputs.test)} {self.inputs.data.title} test images"
        champions = self.variants.registrar.champions(experiment_id, run_url) if self.options.register else []
        records.log_text(report.to_markdown(rows, title), Artifact.COMPARISON_MD)
        records.log_text(report.to_csv(rows), Artifact.COMPARISON_CSV)
        records.log_text(report.to_html(rows, title, run_url=lambda run_id: run_url(experiment_id, run_id),
                                        champions=champions), Artifact.COMPARISON_HTML)
        self.variants.plots.log()
        return rows, registered

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
            self.variants.plots.submit(run_id, artifact, Tag.WARNING, function, *args)

    def _log_summary(self, outcomes: list[VariantOutcome], seconds: float) -> None:
        M = Metric
        quantized = [o for o in outcomes if o.status == "ok" and o.name != FP32]
        summary = {M.VARIANTS_OK: len(quantized), M.VARIANTS_FAILED: sum(o.status == "failed" for o in outcomes),
                   M.VARIANTS_UNSUPPORTED: sum(o.status == "unsupported" for o in outcomes),
                   M.ACCURACY: self.variants.reference.evaluation.accuracy, M.SWEEP_SECONDS: seconds}
        if quantized:
            summary[M.BEST_INT8_ACCURACY] = max(o.evaluation.accuracy for o in quantized)
            summary[M.BEST_INT8_AGREEMENT] = max(o.fidelity.top1_agreement for o in quantized)
        self.variants.recorder.log_metrics(summary)


    def _bench_together(self, outcomes: list[VariantOutcome]) -> None:
        """Time FP32 and every model this sweep made in shared rounds (VariantRunner.bench_together): each round
        times FP32 once, then each variant, so every ratio is against FP32 timed seconds before it, and FP32 is
        not timed again for each variant. Their runs have ended by now; the numbers go on each run and its logged
        model. Reused runs keep the timings they were logged with."""
        reference, made = outcomes[0], [o for o in outcomes[1:]
                                        if o.status == "ok" and o.bench is None and o.model_file is not None]
        timed = self.variants.runner.bench_together([(o.name, o.model_file, o.quantized_engine, o.latency_threads)
                                                     for o in made])
        self.variants.reference.bench = timed.results[FP32]
        for outcome in [reference, *made]:
            if outcome.name in timed.failed:
                say(f"[yellow]![/] {outcome.name}: not timed ({timed.failed[outcome.name]})")
                records.set_run_tags(outcome.run_id, {Tag.WARNING: f"not timed: {timed.failed[outcome.name]}"[:5000]})
                continue
            outcome.bench = timed.results[outcome.name]
            self.variants.recorder.log_bench(outcome.bench, self.variants.reference.bench, ended_run=outcome)

def run_sweep(options: SweepOptions, work_dir: Path | None = None) -> SweepResult:
    """Prepare inputs, then run the sweep in `work_dir` (its files stay: each variant's model file is
    `<work_dir>/<variant>/model.pt` or `model.onnx`), by default a scratch directory removed afterwards."""
    timer = PhaseTimer()
    with timer.phase("load"):
        inputs = prepare_inputs(options)
    if options.register:
        check_registry_targets(options.registered_names(), options.specs(), inputs.model.sha256,
                               fallback=options.fallback_target().active)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ptqflow-sweep-")))
        result = Sweep(options, inputs, Path(work_dir), timer).run()
    result.phase_seconds = timer.summary()
    return result
