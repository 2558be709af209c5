"""`ptqflow tune`: an accuracy-aware search over quantization recipes with Optuna, every trial an MLflow run.

Two objectives, both maximized: top-1 agreement with FP32 on the test set, and batch-256 throughput as a ratio to
ONNX Runtime FP32 timed by the same process (each worker times its own FP32 reference: a ratio compares like with
like only on one machine). A trial is feasible when it reaches `--target-agreement` and `--min-speedup`; the
search stops at the first feasible trial unless told to go on (`--no-stop-at-target`), at `--n-trials` finished
trials or at `--timeout`.

Many machines, one study: the study lives in Optuna's RDB storage (`--storage`, default a sqlite file beside the
MLflow store), so workers started with the same `--study` and `--storage` (PostgreSQL) and the same tracking
server share it; Optuna hands each trial to one worker. The worker that creates the study starts the MLflow parent
run and keeps its id in the study's user attributes; the others wait for it and log their trials under it. Every
worker sends a heartbeat for its running trial; a worker that stops beating (killed) has its trial marked FAIL by
the next worker that looks, which ends that trial's MLflow run FAILED and enqueues the same params again
(optuna's RetryHeartbeatStaleTrialCallback, formerly RetryFailedTrialCallback). The last worker to finish writes
the Pareto front on the parent run, ends it and registers the best feasible trial through the gate.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ptqflow.common.errors import ConfigError
from ptqflow.models.backends.base import backend_error
from ptqflow.pipelines.registry.registrar import check_registry_targets
from ptqflow.pipelines.repair.fallback import candidate_rounds
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.inputs import prepare_inputs, with_calibration
from ptqflow.pipelines.sweep.variant_runs import VariantRuns
from ptqflow.pipelines.tune.options import TuneOptions
from ptqflow.pipelines.tune.results import (CONSTRAINTS_ATTR, FAILURE_ATTR, TRIAL_RUN_ATTR, TrialResult, TuneResult,
                                            feasible, log_front, pareto, summary_line, trial_result)
from ptqflow.pipelines.tune.space import TrialChoice, choice_of, suggest
from ptqflow.pipelines.tune.study import TuneStudy
from ptqflow.pipelines.tune.workers import ENDED_ATTR_PREFIX, claim, generation, grace_s, others_active
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.specs import VARIANTS, VariantSpec, apply_upgrades
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import Artifact, Param, Tag


class Tuner:
    """One worker of a tune study: prepares its inputs, joins the study (TuneStudy), runs trials as variant runs
    (VariantRuns, one per calibration size), and at the end writes the front and, as the last worker, registers the best."""

    def __init__(self, options: TuneOptions, work_dir: Path):
        self.options = options
        self.work_dir = work_dir
        self.timer = PhaseTimer()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.sweeps: dict[int, VariantRuns] = {}
        self.diagnoses: dict[tuple, object] = {}
        self.base: VariantRuns | None = None
        self.study: TuneStudy | None = None
        self.started = time.monotonic()

    @property
    def parent_run_id(self) -> str:
        return self.study.parent_run_id

    @property
    def experiment_id(self) -> str:
        return self.study.experiment_id

    # ---- inputs per calibration size ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load model and data once and make the sweep of the default calibration size, whose calibration set is
        also every trial's AdaRound set (sweep_for)."""
        size = self.options.default_calibration_size
        with self.timer.phase("load"):
            inputs = prepare_inputs(replace(self.options.sweep, variants=()))  # no calibration set yet
        largest = max(self.options.calibration_sizes)
        if largest > len(inputs.data.train):
            raise ConfigError(f"--calibration-sizes {largest} exceeds the {len(inputs.data.train)} training images; "
                              "pass smaller sizes")
        options = replace(self.options.sweep, diagnose=False, register=False, variants=tuple(VARIANTS),
                          calibration_size=size)
        if self.options.sweep.register:  # as a sweep does: a default-named registered model holds one FP32 model
            check_registry_targets(self.options.sweep.registered_names(), options.specs(), inputs.model.sha256)
        inputs = with_calibration(inputs, size, options.calibration_seed, options.validation_size)
        self.base = VariantRuns(options, inputs, self._work_dir(size), self.timer, self.options.bench_config)
        self.base.stop_hint = (f"this worker stopped: run the same ptqflow tune again (study {self.options.study_name}"
                               ") once the tracking store answers; it joins the study where it stood")
        self.sweeps[size] = self.base

    def _work_dir(self, calibration_size: int) -> Path:
        return self.work_dir / f"calibration-{calibration_size}"

    def sweep_for(self, size: int) -> VariantRuns:
        """The sweep whose inputs hold a calibration set of `size` images (same seed); made once, sharing the base
        sweep's FP32 reference and AdaRound set (VariantRuns.with_calibration_size)."""
        if size not in self.sweeps:
            self.sweeps[size] = self.base.with_calibration_size(size, self._work_dir(size))
        return self.sweeps[size]

    def run_reference(self) -> None:
        self.base.convert(reference_meanwhile=True)
        self.base.run_fp32(self.experiment_id, self.parent_run_id, tags={Tag.TUNE_STUDY: self.options.study_name})

    # ---- one trial -----------------------------------------------------------------------------------------
    def objective(self, trial) -> tuple[float, float]:
        import optuna

        choice = suggest(trial, self.options.calibration_sizes)
        trial.set_user_attr("worker", self.worker)
        sweep = self.sweep_for(choice.calibration_size)
        spec = VariantSpec(f"trial-{trial.number:03d}", choice.framework, choice.config)
        upgraded = ""
        try:
            if choice.upgrade_layers:
                spec, upgraded = self._with_upgrades(sweep, spec, choice)
        except Exception as exc:  # noqa: BLE001 - a config whose diagnosis the backend cannot make is no trial
            if not backend_error(exc):
                raise  # ptqflow's own error or the tracking store's: no result of the trial; the worker stops
            trial.set_user_attr(FAILURE_ATTR, f"diagnosis for the upgrades failed: {exc}"[:500])
            raise optuna.TrialPruned(str(exc)) from exc
        tags = {Tag.TUNE_STUDY: self.options.study_name, Tag.TUNE_TRIAL: str(trial.number),
                Tag.TUNE_TRIAL_ID: str(trial._trial_id), Tag.TUNE_SAMPLER_SEED: str(self.study.seed)}
        # The trial is timed in rounds alternating with FP32 (ptqflow.models.runtime.latency.benchmark_against): its speedups
        # compare timings seconds apart, not the trial against a reference taken minutes earlier under another load;
        # its run records the FP32 side (fp32_throughput_ips_b256, fp32_latency_ms_b1_p50).
        outcome = sweep.run_variant(spec, self.experiment_id, self.parent_run_id, tags)
        trial.set_user_attr(TRIAL_RUN_ATTR, outcome.run_id)
        if outcome.run_id:
            self._log_calibration_indices(outcome.run_id, sweep)
            params = {Param.TUNE_PARAM_PREFIX + k: v for k, v in trial.params.items()}
            if choice.config.adaround_scheme is not None:
                params[Param.ADAROUND_CALIBRATION_SIZE] = self.options.default_calibration_size
            if upgraded:
                params[Param.TUNE_PARAM_PREFIX + "upgraded"] = upgraded
            records.log_params_to_run(outcome.run_id, params)
        if outcome.status != "ok":
            if outcome.error is not None and not backend_error(outcome.error):
                raise outcome.error  # ptqflow's own error: no result of the trial; the worker stops with its line
            trial.set_user_attr(FAILURE_ATTR, f"{outcome.status}: {outcome.reason}"[:500])
            raise optuna.TrialPruned(outcome.reason)
        agreement = outcome.fidelity.top1_agreement
        speedup = sweep.speedup(outcome)
        constraints = [self.options.target_agreement - agreement, self.options.min_speedup - speedup]
        trial.set_user_attr(CONSTRAINTS_ATTR, constraints)
        trial.set_constraint("agreement", constraints[0])
        trial.set_constraint("speedup", constraints[1])
        trial.set_user_attr("accuracy", outcome.evaluation.accuracy)
        feasible = all(c <= 0 for c in constraints)
        records.set_run_tags(outcome.run_id, {Tag.TUNE_FEASIBLE: "yes" if feasible else "no"})
        say(f"  trial {trial.number}: {choice.format}, agreement {100 * agreement:.2f}%, "
            f"{speedup:.2f}x ORT FP32 (b256){' [green]feasible[/]' if feasible else ''}")
        return agreement, speedup

    def _log_calibration_indices(self, run_id: str, sweep: VariantRuns) -> None:
        """The trial's calibration set (its own size) and AdaRound's (the default size's), as indices into the
        training set, on the trial's run: trials of one study calibrate on sets of different sizes, so the run, not
        the tune run, says which (`ptqflow diagnose` quantizes the trial again from them)."""
        base = self.base.inputs
        records.log_json_to_run(run_id, {
            "indices": sweep.inputs.calibration_indices.tolist(), "sha256": sweep.inputs.calibration_digest,
            "adaround_indices": base.calibration_indices.tolist(), "adaround_sha256": base.calibration_digest},
            Artifact.CALIBRATION_INDICES)

    def _with_upgrades(self, sweep: VariantRuns, spec: VariantSpec, choice: TrialChoice) -> tuple[VariantSpec, str]:
        """`spec` with its `upgrade_layers` worst layers (its own diagnosis, local SQNR) out of 8 bits."""
        from ptqflow.models.graph.layer_map import activation_inputs, input_layers

        diagnosis = self.diagnoses.get(choice.base_key)
        if diagnosis is None:
            diagnosis = self.diagnoses[choice.base_key] = sweep.diagnose(spec)
        model = sweep.quantized_from
        ranked = [c for chosen in candidate_rounds(diagnosis, choice.upgrade_layers, input_layers(model),
                                                   activation_inputs(model)) for c in chosen]
        upgrades = [c.upgrade(choice.upgrade_kind) for c in ranked[:choice.upgrade_layers]]
        config = apply_upgrades(spec.config, upgrades)
        return replace(spec, config=config), ",".join(u.label for u in upgrades)

    # ---- the worker's loop ---------------------------------------------------------------------------------
    def run(self) -> TuneResult:
        self.prepare()
        self.study = TuneStudy(self.options, self.base.inputs, self.worker)
        study = self.study.open()
        try:
            self.run_reference()
            return self._loop(study)
        except BaseException:
            self._abandon(study)
            raise

    def _abandon(self, study) -> None:
        """Stopped early (Ctrl-C, an error): when no other worker is at work (a trial running, or a fresh beat:
        preparing or between trials), the parent run ends KILLED rather than staying RUNNING."""
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            self.study.beat.stop()
            mine = self.worker
            others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.user_attrs.get("worker") != mine]
            if others or others_active(study.user_attrs, mine, self.options.heartbeat_s):
                return
            self._end_parent(study, "KILLED")

    def _loop(self, study) -> TuneResult:
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        deadline = time.monotonic() + self.options.timeout_s if self.options.timeout_s else math.inf
        while time.monotonic() < deadline:
            fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            if self.options.stop_at_target and any(feasible(t) for t in trials):
                break
            if finished >= self.options.n_trials:
                break
            if finished + running >= self.options.n_trials and not waiting:
                time.sleep(min(5, self.options.heartbeat_s))  # the last trials are others': wait, they may die
                continue
            # Nothing caught: a trial the backend cannot make is pruned in objective; any other error (ptqflow's,
            # the tracking store's) ends the trial FAIL and stops this worker with its one line.
            study.optimize(self.objective, n_trials=1, catch=(), gc_after_trial=True)
        return self.finish(study)

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self, study) -> TuneResult:
        """Log the Pareto front on the parent run; the last worker ends it and registers the best feasible trial."""
        from optuna.trial import TrialState

        trials = [trial_result(t) for t in study.get_trials(deepcopy=False)
                  if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        complete = [t for t in trials if t.state == "COMPLETE"]
        front = pareto(complete)
        best = max((t for t in complete if t.feasible), key=lambda t: (t.agreement, t.speedup), default=None)
        log_front(self.parent_run_id, trials, front, best, self.options, self.started,
                  len(self.base.inputs.test))
        result = TuneResult(self.options.study_name, self.parent_run_id, trials, front, best)
        # Done before looking at the others: of two workers finishing together, at least one sees the other done.
        self.study.beat.stop()
        if not self._others_working(study) and self._end_parent(study, "FINISHED"):
            result.finished_parent = True
            if best is not None and self.options.sweep.register:
                result.registered = self._register(best)
        say(summary_line(result, self.options))
        return result

    def _end_parent(self, study, status: str) -> bool:
        """End the parent run `status` if it runs and this worker's claim on ending it goes in (workers.claim): of
        workers ending it at once, one ends it (and registers). Returns whether this worker ended it."""
        if runs.get_run(self.parent_run_id).info.status != "RUNNING":
            return False
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        key = f"{ENDED_ATTR_PREFIX}{generation(study.user_attrs)}"
        if not claim(study, key, {"worker": self.worker, "status": status, "time": when}):
            return False
        records.set_run_tags(self.parent_run_id, {Tag.TUNE_ENDED_BY: f"{self.worker} at {when} ({status})"})
        runs.terminate(self.parent_run_id, status)
        return True

    def _others_working(self, study) -> bool:
        """Whether another worker is still at work: a trial running, or its beat fresh (preparing, or between two
        trials), after waiting up to one grace period for dead workers to go stale (their trials end FAILED, and
        their MLflow runs with them, never RUNNING). Enqueued trials nobody started (WAITING) do not keep a
        finished study open."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        deadline = time.monotonic() + grace_s(self.options.heartbeat_s)
        while True:
            fail_stale_trials(study)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            active = others_active(study.user_attrs, self.worker, self.options.heartbeat_s)
            if not (running or active) or time.monotonic() > deadline:
                return bool(running or active)
            time.sleep(min(2, self.options.heartbeat_s))

    def _register(self, best: TrialResult) -> list:
        from ptqflow.pipelines.repair.diagnose import config_of

        run = runs.get_run(best.run_id)
        choice = choice_of(best.params)
        spec = VariantSpec(run.data.tags.get(Tag.VARIANT, f"trial-{best.number:03d}"), choice.framework,
                           config_of(run))
        return self.sweep_for(choice.calibration_size).register_run(spec, run)


def run_tune(options: TuneOptions, work_dir: Path | None = None) -> TuneResult:
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ptqflow-tune-")))
        return Tuner(options, Path(work_dir)).run()
