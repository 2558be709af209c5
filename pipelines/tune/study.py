"""A tune study and its MLflow parent run: created by the first worker, joined by the others, which must measure
on the same inputs; a worker that stops sending heartbeats has its trial's run ended FAILED and the trial retried."""

from __future__ import annotations

import json
import os
import time

from ptqflow.common.errors import ConfigError, first_line
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.inputs import SweepInputs
from ptqflow.pipelines.tune.options import TuneOptions
from ptqflow.pipelines.tune.space import SPACE, sweep_defaults
from ptqflow.pipelines.tune.storage import default_storage, open_storage, storage_url
from ptqflow.pipelines.tune.workers import REOPENED_ATTR_PREFIX, WorkerBeat, claim, generation
from ptqflow.tracking import connection
from ptqflow.tracking import experiments
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import Artifact, Param, Tag

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow run every trial is a child of
INPUTS_ATTR = "inputs"  # study user attribute: model, data and options every trial is measured on
EXPERIMENT_ATTR = "mlflow_experiment_id"
MAX_RETRIES = 2  # a trial whose worker died is run again at most this often
PARENT_WAIT_S = 300  # how long a joining worker waits for the creator to record the parent run


class TuneStudy:
    """One worker's handle on the study: `open()` creates or joins it; then `study`, `parent_run_id`,
    `experiment_id` and `seed` (the sampler's) are set."""

    def __init__(self, options: TuneOptions, inputs: SweepInputs, worker: str):
        self.options = options
        self.inputs = inputs  # what this worker measures on (the default calibration size's sweep inputs)
        self.worker = worker
        self.study = None
        self.parent_run_id = ""
        self.experiment_id = ""
        self.public_storage = ""
        self.seed = options.seed
        self.beat: WorkerBeat | None = None  # this worker's beat in the study, from when it has joined

    def open(self):
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
                              f"{first_line(exc, 300)}; check --storage") from exc
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
        self.beat = WorkerBeat(study, self.worker, self.options.heartbeat_s)
        try:
            if created:
                self._start_parent(study)
                self.beat.start()
                if self.options.enqueue_defaults:
                    for params in sweep_defaults(self.options.default_calibration_size):
                        study.enqueue_trial(params, skip_if_exists=True)
            else:
                self._join_parent(study)
        except BaseException:
            self.beat.stop()
            raise
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
                Tag.MODEL_SHA256: self.inputs.model.sha256}
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
        # Beating before looking at the parent: a worker finishing now sees this one at work and leaves the run open.
        self.beat.start()
        if parent.info.status != "RUNNING":  # a finished study taken up again (more --n-trials): open it again
            self._reopen_parent(study)
        say(f"joined tune study [bold]{self.options.study_name}[/] (parent run {self.parent_run_id})")

    def _reopen_parent(self, study) -> None:
        """Set the ended parent run RUNNING again, once for all workers joining now (the one whose claim goes in),
        with the time and the worker on the run (Tag.TUNE_REOPENED_PREFIX + n)."""
        number = generation(study.user_attrs) + 1
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not claim(study, f"{REOPENED_ATTR_PREFIX}{number}", {"worker": self.worker, "time": when}):
            return  # another worker reopened it a moment ago
        runs.reopen(self.parent_run_id)
        records.set_run_tags(self.parent_run_id, {Tag.TUNE_REOPENED_PREFIX + str(number): f"{when} by {self.worker}"})
        say(f"reopened the ended parent run {self.parent_run_id} (study taken up again, time {number})")

    def study_inputs(self) -> dict:
        """What every trial of the study is measured on: workers joining it must have the same."""
        inputs = self.inputs
        return {"model_sha256": inputs.model.sha256, "dataset_sha256": inputs.data.digest,
                "test_images": len(inputs.test), "calibration_seed": self.options.sweep.calibration_seed,
                "calibration_sizes": list(self.options.calibration_sizes),
                "adaround_iterations": self.options.sweep.adaround_iterations,
                "validation_size": self.options.sweep.validation_size,  # held-out images choosing the rounding
                # what makes a trial feasible: workers on other targets would stop at or register different trials
                "target_agreement": self.options.target_agreement, "min_speedup": self.options.min_speedup,
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
