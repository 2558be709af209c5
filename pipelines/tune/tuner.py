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
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptqflow.common.errors import ConfigError, PtqflowError
from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.repair.fallback import candidate_rounds
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.sweep import (Sweep, SweepOptions, VariantOutcome, _speedup_b1, _speedup_b256, prepare_inputs,
                             with_calibration)
from ptqflow.models.runtime.latency import BenchConfig
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.tune.space import CALIBRATION_SIZES, SPACE, TrialChoice, choice_of, suggest, sweep_defaults
from ptqflow.pipelines.variants.specs import VARIANTS, VariantSpec, apply_upgrades
from ptqflow.tracking import connection
from ptqflow.tracking import experiments
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow run every trial is a child of
INPUTS_ATTR = "inputs"  # study user attribute: model, data and options every trial is measured on
EXPERIMENT_ATTR = "mlflow_experiment_id"
TRIAL_RUN_ATTR = "mlflow_run_id"  # trial user attribute
CONSTRAINTS_ATTR = "constraints"  # trial user attribute: [agreement, speed] shortfalls, <= 0 feasible
FAILURE_ATTR = "failure"  # trial user attribute: why the config could not be made or measured
DEFAULT_STUDY_SUFFIX = "-tune"
DEFAULT_HEARTBEAT_S = 30
MAX_RETRIES = 2  # a trial whose worker died is run again at most this often
STORAGE_OPEN_ATTEMPTS = 5  # opening a new database's storage while other workers create its tables
PARENT_WAIT_S = 300  # how long a joining worker waits for the creator to record the parent run


@dataclass
class TuneOptions:
    sweep: SweepOptions = field(default_factory=SweepOptions)  # model, data, inputs, experiment, gate, registry
    n_trials: int = 40  # finished trials (complete or pruned) of the whole study, over all workers
    timeout_s: float | None = 1200.0  # this worker stops starting trials after this many seconds
    target_agreement: float = 0.995
    min_speedup: float = 1.0  # batch-256 throughput over ORT FP32's
    stop_at_target: bool = True  # stop at the first feasible trial
    study: str | None = None  # default: `<model file stem>-tune`
    storage: str | None = None  # an SQLAlchemy URL; default: sqlite file beside the MLflow store
    seed: int = 0  # of the study creator's sampler; a joining worker adds its pid (two workers, two sequences)
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    enqueue_defaults: bool = True  # a new study's first trials are the default sweep's recipes
    calibration_sizes: tuple[int, ...] = CALIBRATION_SIZES  # the space's choices of calibration-set size
    bench_config: BenchConfig = BenchConfig()  # how each model is timed (the sweep's default)

    def __post_init__(self):
        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"--n-trials must be a whole number, at least 1; got {self.n_trials!r}")
        if self.timeout_s is not None and not (self.timeout_s > 0):
            raise ConfigError(f"--timeout is in seconds, more than 0; got {self.timeout_s!r}")
        if not 0 < self.target_agreement <= 1:
            raise ConfigError(f"--target-agreement is a share in (0, 1], e.g. 0.995; got {self.target_agreement!r}")
        if not (self.min_speedup >= 0 and math.isfinite(self.min_speedup)):
            raise ConfigError(f"--min-speedup is a ratio to ORT FP32 throughput, 0 or more; got {self.min_speedup!r}")
        if self.heartbeat_s < 1:
            raise ConfigError(f"--heartbeat is in seconds, at least 1; got {self.heartbeat_s!r}")
        object.__setattr__(self, "calibration_sizes", tuple(int(n) for n in self.calibration_sizes))
        if not self.calibration_sizes or min(self.calibration_sizes) < 1:
            raise ConfigError(f"--calibration-sizes takes sizes of at least 1; got {self.calibration_sizes!r}")
        if not self.sweep.bench:
            raise ConfigError("tune times every trial (speed is one of its objectives): benchmarking must stay on")
        if self.study is not None:
            from ptqflow.pipelines.shared.names import validate_name

            validate_name("--study", self.study)

    @property
    def default_calibration_size(self) -> int:
        """The size of the space nearest the sweep's (1000): the default recipes' size, and AdaRound's set."""
        return min(self.calibration_sizes, key=lambda n: abs(n - self.sweep.calibration_size))

    @property
    def study_name(self) -> str:
        return self.study or f"{self.sweep.model_path.stem}{DEFAULT_STUDY_SUFFIX}"


def default_storage() -> str:
    """Beside the MLflow store when it is a sqlite file (`optuna.db` next to `mlflow.db`), else in the working
    directory: one machine's default. Several machines pass --storage postgresql://..."""
    uri = connection.tracking_uri()
    store = connection.sqlite_file(uri)
    directory = store.parent if store is not None else Path.cwd()
    return f"sqlite:///{(directory / 'optuna.db').resolve()}"


def storage_url(url: str) -> str:
    """The SQLAlchemy URL Optuna opens: `postgresql://` through psycopg 3, the driver ptqflow installs."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def open_storage(url: str, **kwargs):
    """optuna's RDBStorage on `url`, tried again while another worker is creating the tables of the same new database:
    Optuna creates them when a storage is first opened, and PostgreSQL's CREATE TABLE is not atomic, so of workers
    started together on an empty database all but one fail with "already exists" or a unique violation on a system
    catalog. The next try finds the tables (and the schema version) in place."""
    import random

    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, STORAGE_OPEN_ATTEMPTS + 1):
        try:
            return RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            if attempt == STORAGE_OPEN_ATTEMPTS:
                raise
            time.sleep(0.2 + random.random())  # not in step with the other worker


@dataclass
class TrialResult:
    number: int
    params: dict
    agreement: float | None
    speedup: float | None
    accuracy: float | None
    run_id: str
    feasible: bool
    state: str
    worker: str = ""

    def row(self) -> dict:
        return {"trial": self.number, "state": self.state, "top1_agreement": self.agreement,
                "speedup_vs_ort_fp32_b256": self.speedup, "accuracy": self.accuracy, "feasible": self.feasible,
                "run_id": self.run_id, **{k: self.params[k] for k in sorted(self.params)}}


@dataclass
class TuneResult:
    study: str
    parent_run_id: str
    trials: list[TrialResult]
    pareto: list[TrialResult]
    best: TrialResult | None  # the best feasible trial (agreement, then speed), or None
    registered: list = field(default_factory=list)
    finished_parent: bool = False  # this worker was the last and ended the parent run


class Tuner:
    """One worker of a tune study."""

    def __init__(self, options: TuneOptions, work_dir: Path):
        self.options = options
        self.work_dir = work_dir
        self.timer = PhaseTimer()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.sweeps: dict[int, Sweep] = {}
        self.diagnoses: dict[tuple, object] = {}
        self.base: Sweep | None = None
        self.parent_run_id = ""
        self.experiment_id = ""
        self.seed = options.seed
        self.started = time.monotonic()

    # ---- study and parent run ------------------------------------------------------------------------------
    def open_study(self):
        """Create the study (and the MLflow parent run), or join it. Raises ConfigError on a bad storage URL."""
        import warnings

        import optuna

        # heartbeats and fail_stale_trials are marked experimental; they are what several workers need
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = storage_url(self.options.storage or default_storage())
        self.public_storage = connection.without_credentials(url)  # for params and messages
        try:
            # Optuna 5's name for RetryFailedTrialCallback: retries trials that went stale, not ones that raised.
            storage = open_storage(url, heartbeat_interval=self.options.heartbeat_s,
                                   heartbeat_stale_trial_callback=self._dead_trial(
                                       RetryHeartbeatStaleTrialCallback(MAX_RETRIES)))
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors: one line naming the storage
            raise ConfigError(f"cannot open the tune storage {self.public_storage}: "
                              f"{str(exc).strip().splitlines()[0][:300]}; check --storage") from exc
        name = self.options.study_name
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "maximize"],
                                        sampler=self._sampler(self.options.seed))
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage)
            created = False
            if [d.name for d in study.directions] != ["MAXIMIZE", "MAXIMIZE"]:
                raise ConfigError(f"study {name!r} in {self.public_storage} is not a ptqflow tune study; pick another "
                                  "--study") from None
            self.seed = self.options.seed + os.getpid()
            study.sampler = self._sampler(self.seed)
        self.study = study
        if created:
            self._start_parent(study)
            if self.options.enqueue_defaults:
                for params in sweep_defaults(self.options.default_calibration_size):
                    study.enqueue_trial(params, skip_if_exists=True)
        else:
            self._join_parent(study)
        return study

    def _sampler(self, seed: int):
        import optuna

        # Constraints come from each trial (Trial.set_constraint in objective): infeasible trials guide the search
        # away from what misses the target.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)

    def _start_parent(self, study) -> None:
        experiment_id = experiments.ensure_experiment(self.options.sweep.experiment)
        experiments.mark_experiment(experiment_id)
        o, P = self.options, Param
        run_name = f"tune {o.study_name} · {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {Tag.ROLE: Tag.ROLE_TUNE, Tag.TUNE_STUDY: o.study_name, Tag.TUNE_CREATED_BY: self.worker,
                Tag.MODEL_SHA256: self.base.inputs.model.sha256}
        with runs.detached_run(experiment_id, run_name, tags) as run:
            run.log_params({P.TUNE_STUDY: o.study_name, P.TUNE_STORAGE: self.public_storage,
                            P.TUNE_N_TRIALS: o.n_trials, P.TUNE_TIMEOUT_S: o.timeout_s or 0,
                            P.TARGET_AGREEMENT: o.target_agreement, P.TUNE_MIN_SPEEDUP: o.min_speedup,
                            P.TUNE_SEED: o.seed, P.MODEL_PATH: str(o.sweep.model_path),
                            P.DATA_DIR: str(o.sweep.data_dir), P.CALIBRATION_SEED: o.sweep.calibration_seed,
                            P.TEST_LIMIT: o.sweep.test_limit or 0, P.ADAROUND_ITERATIONS: o.sweep.adaround_iterations,
                            P.TUNE_CALIBRATION_SIZES: ",".join(map(str, o.calibration_sizes)),
                            P.TUNE_HEARTBEAT_S: o.heartbeat_s})
            records.log_json_to_run(run.run_id, SPACE, Artifact.TUNE_SPACE)
        # The experiment first: a joining worker takes the parent run's id as the sign that both are there.
        study.set_user_attr(INPUTS_ATTR, self.study_inputs())
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr(PARENT_RUN_ATTR, run.run_id)
        self.parent_run_id, self.experiment_id = run.run_id, experiment_id
        say(f"tune study [bold]{o.study_name}[/] created in {self.public_storage}; parent run "
            f"{run.run_id}")

    def _join_parent(self, study) -> None:
        deadline = time.monotonic() + PARENT_WAIT_S
        while True:
            attrs = study.user_attrs  # read from the storage each time; one read for both attributes
            if PARENT_RUN_ATTR in attrs and EXPERIMENT_ATTR in attrs:
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"study {self.options.study_name!r} has no MLflow parent run after "
                                  f"{PARENT_WAIT_S} s: the worker that created it died before starting it; delete "
                                  "the study (optuna delete-study) or pick another --study")
            time.sleep(1)
        self.parent_run_id = attrs[PARENT_RUN_ATTR]
        self.experiment_id = attrs[EXPERIMENT_ATTR]
        parent = runs.get_run(self.parent_run_id)
        theirs, ours = attrs.get(INPUTS_ATTR, {}), self.study_inputs()
        if theirs.get("model_sha256") != ours["model_sha256"]:
            raise ConfigError(f"study {self.options.study_name!r} tunes another model (SHA-256 "
                              f"{str(theirs.get('model_sha256', '?'))[:12]}…); pass the same --model or another "
                              "--study")
        differ = sorted(key for key in ours if theirs.get(key) != ours[key])
        if differ:  # trials measured on other inputs are not comparable: one study, one set of inputs
            raise ConfigError(f"study {self.options.study_name!r} was measured on other inputs ({', '.join(differ)}: "
                              f"{', '.join(f'{theirs.get(k)!r} there, {ours[k]!r} here' for k in differ)}); pass "
                              "the same data and options, or another --study")
        if parent.info.status != "RUNNING":  # a finished study taken up again (more --n-trials): open it again
            runs.reopen(self.parent_run_id)
        say(f"joined tune study [bold]{self.options.study_name}[/] (parent run {self.parent_run_id})")

    def study_inputs(self) -> dict:
        """What every trial of the study is measured on: workers joining it must have the same."""
        inputs = self.base.inputs
        return {"model_sha256": inputs.model.sha256, "dataset_sha256": inputs.data.digest,
                "test_images": len(inputs.test), "calibration_seed": self.options.sweep.calibration_seed,
                "calibration_sizes": list(self.options.calibration_sizes),
                "adaround_iterations": self.options.sweep.adaround_iterations,
                "layout": inputs.transform.layout, "preprocessing": inputs.transform.preprocessing.value,
                "inputs": json.loads(json.dumps(inputs.input_params(), default=str))}

    def _dead_trial(self, retry):
        """The storage's failed-trial callback: the MLflow run of a trial whose worker stopped beating ends FAILED,
        then the trial is enqueued again."""
        def callback(study, trial) -> None:
            reason = (f"worker {trial.user_attrs.get('worker', '?')} stopped sending heartbeats (killed or lost): "
                      f"trial {trial.number} failed; retried as a new trial")
            for run in runs.runs_tagged(self.experiment_id, Tag.TUNE_TRIAL_ID, str(trial._trial_id)):
                if run.info.status == "RUNNING":
                    records.set_run_tags(run.info.run_id, {Tag.STATUS: Tag.STATUS_FAILED, Tag.REASON: reason})
                    runs.terminate(run.info.run_id, "FAILED")
            say(f"[yellow]![/] {reason}")
            retry(study, trial)
        return callback

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
        inputs = with_calibration(inputs, size, options.calibration_seed)
        self.base = self._sweep(options, inputs)
        self.sweeps[options.calibration_size] = self.base

    def _sweep(self, options: SweepOptions, inputs) -> Sweep:
        sweep = Sweep(options, inputs, self.work_dir / f"calibration-{options.calibration_size}", self.timer)
        sweep.runner.options = replace(sweep.runner.options, bench_config=self.options.bench_config)
        return sweep

    def sweep_for(self, size: int) -> Sweep:
        """The sweep object whose inputs hold a calibration set of `size` images (same seed); made once."""
        if size not in self.sweeps:
            base = self.base
            inputs = with_calibration(base.inputs, size, base.options.calibration_seed)
            sweep = self._sweep(replace(base.options, calibration_size=size), inputs)
            sweep.runner.convert(base.specs)
            # the FP32 reference does not depend on the calibration set: measured once per worker
            sweep.reference, sweep.runner.reference = base.reference, base.runner.reference
            sweep.parent_run_id = base.parent_run_id
            # AdaRound reconstructs each layer's output on the default calibration set whatever the trial's size:
            # the size searched is the activation ranges', and AdaRound's result stays cached across sizes (each
            # trial run records the AdaRound set's size as adaround_calibration_size)
            sweep.runner.rounding_set = (base.inputs.calibration, base.inputs.calibration_digest)
            self.sweeps[size] = sweep
        return self.sweeps[size]

    def run_reference(self) -> None:
        base = self.base
        base.runner.convert(base.specs, reference_meanwhile=True)
        base.parent_run_id = self.parent_run_id
        base.run_tags = {Tag.TUNE_STUDY: self.options.study_name}
        base.run_fp32(self.experiment_id, self.parent_run_id)

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
        except Exception as exc:  # noqa: BLE001 - a config whose diagnosis fails is no trial
            trial.set_user_attr(FAILURE_ATTR, f"diagnosis for the upgrades failed: {exc}"[:500])
            raise optuna.TrialPruned(str(exc)) from exc
        sweep.run_tags = {Tag.TUNE_STUDY: self.options.study_name, Tag.TUNE_TRIAL: str(trial.number),
                          Tag.TUNE_TRIAL_ID: str(trial._trial_id), Tag.TUNE_SAMPLER_SEED: str(self.seed)}
        # The trial is timed in rounds alternating with FP32 (ptqflow.models.runtime.latency.benchmark_against): its speedups
        # compare timings seconds apart, not the trial against a reference taken minutes earlier under another load;
        # its run records the FP32 side (fp32_throughput_ips_b256, fp32_latency_ms_b1_p50).
        outcome = sweep.run_variant(spec, self.experiment_id, self.parent_run_id)
        trial.set_user_attr(TRIAL_RUN_ATTR, outcome.run_id)
        if outcome.run_id:
            params = {Param.TUNE_PARAM_PREFIX + k: v for k, v in trial.params.items()}
            if choice.config.adaround_scheme is not None:
                params[Param.ADAROUND_CALIBRATION_SIZE] = self.options.default_calibration_size
            if upgraded:
                params[Param.TUNE_PARAM_PREFIX + "upgraded"] = upgraded
            records.log_params_to_run(outcome.run_id, params)
        if outcome.status != "ok":
            trial.set_user_attr(FAILURE_ATTR, f"{outcome.status}: {outcome.reason}"[:500])
            raise optuna.TrialPruned(outcome.reason)
        agreement = outcome.fidelity.top1_agreement
        speedup = self.speedup(outcome, sweep)
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

    @staticmethod
    def speedup(outcome: VariantOutcome, sweep: Sweep) -> float:
        """Batch-256 throughput over this worker's ORT FP32 (batch 1 latency for models fixed at batch 1)."""
        value = _speedup_b256(outcome.bench, sweep.reference.bench)
        if value is None:
            value = _speedup_b1(outcome.bench, sweep.reference.bench)
        return float(value) if value is not None else 0.0

    def _with_upgrades(self, sweep: Sweep, spec: VariantSpec, choice: TrialChoice) -> tuple[VariantSpec, str]:
        """`spec` with its `upgrade_layers` worst layers (its own diagnosis, local SQNR) out of 8 bits."""
        from ptqflow.models.graph.layer_map import activation_inputs, input_layers

        diagnosis = self.diagnoses.get(choice.base_key)
        if diagnosis is None:
            diagnosis = self.diagnoses[choice.base_key] = sweep.runner.diagnose(spec)
        model = sweep.runner.quantization_source.onnx.proto
        ranked = [c for chosen in candidate_rounds(diagnosis, choice.upgrade_layers, input_layers(model),
                                                   activation_inputs(model)) for c in chosen]
        upgrades = [c.upgrade(choice.upgrade_kind) for c in ranked[:choice.upgrade_layers]]
        config = apply_upgrades(spec.config, upgrades)
        return replace(spec, config=config), ",".join(u.label for u in upgrades)

    # ---- the worker's loop ---------------------------------------------------------------------------------
    def run(self) -> TuneResult:
        self.prepare()
        study = self.open_study()
        try:
            self.run_reference()
            return self._loop(study)
        except BaseException:
            self._abandon(study)
            raise

    def _abandon(self, study) -> None:
        """Stopped early (Ctrl-C, an error): when no other worker has a trial running, the parent run ends KILLED
        rather than staying RUNNING."""
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            mine = self.worker
            others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.user_attrs.get("worker") != mine]
            if not others and runs.get_run(self.parent_run_id).info.status == "RUNNING":
                runs.terminate(self.parent_run_id, "KILLED")

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
            if self.options.stop_at_target and any(_feasible(t) for t in trials):
                break
            if finished >= self.options.n_trials:
                break
            if finished + running >= self.options.n_trials and not waiting:
                time.sleep(min(5, self.options.heartbeat_s))  # the last trials are others': wait, they may die
                continue
            study.optimize(self.objective, n_trials=1, catch=(PtqflowError,), gc_after_trial=True)
        return self.finish(study)

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self, study) -> TuneResult:
        """Log the Pareto front on the parent run; the last worker ends it and registers the best feasible trial."""
        from optuna.trial import TrialState

        trials = [self._result(t) for t in study.get_trials(deepcopy=False)
                  if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        complete = [t for t in trials if t.state == "COMPLETE"]
        front = pareto(complete)
        best = max((t for t in complete if t.feasible), key=lambda t: (t.agreement, t.speedup), default=None)
        self._log_front(trials, front, best)
        result = TuneResult(self.options.study_name, self.parent_run_id, trials, front, best)
        parent = runs.get_run(self.parent_run_id)
        if not self._others_running(study) and parent.info.status == "RUNNING":
            runs.terminate(self.parent_run_id, "FINISHED")
            result.finished_parent = True
            if best is not None and self.options.sweep.register:
                result.registered = self._register(best)
        say(_summary_line(result, self.options))
        return result

    def _others_running(self, study) -> bool:
        """Whether another worker still runs a trial, after waiting up to one grace period (two heartbeats) for
        the trials of dead workers to go stale: those end FAILED (and their MLflow runs with them), never RUNNING.
        Enqueued trials nobody started (WAITING) do not keep a finished study open."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        deadline = time.monotonic() + 2 * self.options.heartbeat_s + 2
        while True:
            fail_stale_trials(study)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running or time.monotonic() > deadline:
                return bool(running)
            time.sleep(min(2, self.options.heartbeat_s))

    def _result(self, t) -> TrialResult:
        values = t.values or [None, None]
        return TrialResult(t.number, dict(t.params), values[0], values[1], t.user_attrs.get("accuracy"),
                           t.user_attrs.get(TRIAL_RUN_ATTR, ""), _feasible(t), t.state.name,
                           t.user_attrs.get("worker", ""))

    def _log_front(self, trials: list[TrialResult], front: list[TrialResult], best: TrialResult | None) -> None:
        records.log_text_to_run(self.parent_run_id, _csv([t.row() for t in trials]), Artifact.TUNE_TRIALS_CSV)
        records.log_text_to_run(self.parent_run_id, _csv([t.row() for t in front]), Artifact.TUNE_PARETO_CSV)
        records.log_text_to_run(self.parent_run_id, pareto_markdown(front, best, self.options),
                                Artifact.TUNE_PARETO_MD)
        png = plots.tune_pareto(
            [(t.speedup, t.agreement, t.params.get("format", "?")) for t in trials if t.state == "COMPLETE"],
            [(t.speedup, t.agreement) for t in front],
            (best.speedup, best.agreement) if best else None, self.options.target_agreement,
            self.options.min_speedup, f"{self.options.study_name}: {len(trials)} trials")
        records.log_bytes_to_run(self.parent_run_id, png, Artifact.TUNE_PARETO_PLOT)
        M = Metric
        metrics = {M.TUNE_TRIALS: len(trials), M.TUNE_PARETO_SIZE: len(front),
                   M.TUNE_SECONDS: time.monotonic() - self.started}
        if best is not None:
            metrics.update({M.BEST_FEASIBLE_AGREEMENT: best.agreement, M.BEST_FEASIBLE_SPEEDUP_B256: best.speedup})
        records.log_metrics_to_run(self.parent_run_id, precision.rounded(metrics, len(self.base.inputs.test)))

    def _register(self, best: TrialResult) -> list:
        from ptqflow.pipelines.repair.diagnose import config_of

        run = runs.get_run(best.run_id)
        choice = choice_of(best.params)
        spec = VariantSpec(run.data.tags.get(Tag.VARIANT, f"trial-{best.number:03d}"), choice.framework,
                           config_of(run))
        sweep = self.sweep_for(choice.calibration_size)
        return sweep.registrar.register_best([sweep.outcome_of_run(spec, run)], sweep.reference.evaluation.accuracy)


def _constraints(trial) -> list[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, [1.0, 1.0])


def _feasible(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in _constraints(trial))


def pareto(trials: list[TrialResult]) -> list[TrialResult]:
    """The trials no other beats on both agreement and speed, fastest first."""
    points = [(-t.speedup, t.agreement) for t in trials]
    return [trials[i] for i in plots.pareto_front(points)]


def pareto_markdown(front: list[TrialResult], best: TrialResult | None, options: TuneOptions) -> str:
    lines = [f"# Pareto front of {options.study_name}", "",
             f"Target: top-1 agreement >= {100 * options.target_agreement:g}% and >= {options.min_speedup:g}x ORT "
             "FP32 batch-256 throughput (same process).", "",
             "| trial | format | agreement | speed vs ORT FP32 (b256) | feasible | upgraded layers | run |",
             "|---|---|---|---|---|---|---|"]
    for t in front:
        lines.append(f"| {t.number} | {t.params.get('format', '')} | {100 * t.agreement:.2f}% | {t.speedup:.2f}x | "
                     f"{'yes' if t.feasible else 'no'} | {t.params.get('upgrade_layers', 0)} | {t.run_id[:8]} |")
    lines += ["", f"Best feasible: trial {best.number}" if best else "No trial met the target."]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _summary_line(result: TuneResult, options: TuneOptions) -> str:
    done = sum(t.state == "COMPLETE" for t in result.trials)
    if result.best is None:
        return (f"[yellow]![/] {done} trials, none reached {100 * options.target_agreement:g}% agreement at "
                f">= {options.min_speedup:g}x ORT FP32; Pareto front of {len(result.pareto)} on parent run "
                f"{result.parent_run_id}")
    b = result.best
    return (f"[green]✓[/] best feasible: trial {b.number} ({b.params.get('format')}), agreement "
            f"{100 * b.agreement:.2f}%, {b.speedup:.2f}x ORT FP32 (b256); {done} trials, parent run "
            f"{result.parent_run_id}")


def run_tune(options: TuneOptions, work_dir: Path | None = None) -> TuneResult:
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ptqflow-tune-")))
        return Tuner(options, Path(work_dir)).run()
