"""Two `ptqflow tune` workers on one study, the way two machines of a team would run it: the study in PostgreSQL
(Optuna RDB storage), the runs on an `mlflow server` with proxied artifacts, each worker in its own working
directory with its own cache (no shared filesystem). Both start at the same moment, so they race to create the
study; the one that won (it started the MLflow parent run) is SIGKILLed in the middle of a trial. The other must
notice the dead trial through its heartbeat, end its MLflow run FAILED, run it again, finish the study and end the
parent run.

Skipped when the PostgreSQL binaries or the drivers are missing; `bash .ci/services.sh` installs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ADAROUND_ITERATIONS
from processes import start_in_own_group, stop_process_groups, tail
from servers import postgres, start_tracking_server  # noqa: F401  (fixture)

from ptqflow.tracking.keys import Artifact, Tag

pytestmark = [pytest.mark.server,
              # RetryHeartbeatStaleTrialCallback.retried_trial_number is marked experimental; it is what ptqflow uses
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

PROJECT = Path(__file__).resolve().parents[1]
STUDY = "team-tune"
EXPERIMENT = "tune-team"
N_TRIALS = 6
HEARTBEAT_S = 2  # a killed worker's trial is stale after 2 * 2 s
KILL_TIMEOUT = 300  # until the study's creator is inside a trial
WORKER_TIMEOUT = 600  # until the surviving worker has ended the study


@dataclass
class Worker:
    name: str
    cwd: Path
    log: Path
    process: subprocess.Popen


def tune_command(model: Path, data_dir: Path, storage: str) -> list[str]:
    return [sys.executable, "-m", "ptqflow", "tune", "--model", str(model), "--data-dir", str(data_dir),
            "--experiment", EXPERIMENT, "--study", STUDY, "--storage", storage, "--calibration-sizes", "50,100",
            "--adaround-iterations", str(ADAROUND_ITERATIONS), "--n-trials", str(N_TRIALS), "--no-stop-at-target",
            "--heartbeat", str(HEARTBEAT_S), "--timeout", "900", "--no-register"]


def explain(workers: list[Worker]) -> str:
    return "\n".join(f"--- worker {w.name} (pid {w.process.pid}, exit {w.process.poll()}), {w.log}:\n"
                     f"{tail(w.log, 60)}" for w in workers)


def search(client, experiment_id: str, filter_string: str = "") -> list:
    return client.search_runs([experiment_id], filter_string, max_results=1000)


def wait_for_creator_mid_trial(client, workers: list[Worker]):
    """The worker that created the study (its host:pid is on the parent run) and the RUNNING MLflow run of a trial it is
    running, polled fast: a trial's run lives a few seconds on the tiny model."""
    deadline = time.monotonic() + KILL_TIMEOUT
    by_pid = {str(w.process.pid): w for w in workers}
    creator = None
    while time.monotonic() < deadline:
        for w in workers:
            assert w.process.poll() is None, f"worker {w.name} exited before the kill\n{explain(workers)}"
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            if creator is None:
                parents = search(client, experiment.experiment_id, f"tags.`{Tag.ROLE}` = '{Tag.ROLE_TUNE}'")
                if parents:
                    assert len(parents) == 1, "two workers created the study's parent run"
                    creator = by_pid[parents[0].data.tags[Tag.TUNE_CREATED_BY].rsplit(":", 1)[1]]
            if creator is not None:
                running = [r for r in search(client, experiment.experiment_id,
                                             f"tags.`{Tag.PID}` = '{creator.process.pid}' and "
                                             "attributes.status = 'RUNNING'")
                           if Tag.TUNE_TRIAL in r.data.tags]
                if running:
                    return creator, running[0]
        time.sleep(0.15)
    raise AssertionError(f"the study's creator ran no trial within {KILL_TIMEOUT} s\n{explain(workers)}")


def test_two_tune_workers_survive_a_killed_one(postgres, tiny_model, cifar_dir, tmp_path):  # noqa: F811
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from ptqflow.pipelines.tune.storage import storage_url
    from ptqflow.pipelines.tune.study import PARENT_RUN_ATTR

    storage = postgres.create_database("optuna")  # the study's own database, not the MLflow server's
    with start_tracking_server(postgres, tmp_path / "server") as server:
        workers: list[Worker] = []
        try:
            for name in ("a", "b"):
                cwd = tmp_path / f"worker-{name}"
                cwd.mkdir()
                env = server.client_env()
                env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
                env["XDG_CACHE_HOME"] = str(tmp_path / f"cache-{name}")  # no AdaRound cache shared between machines
                log = tmp_path / f"worker-{name}.log"
                workers.append(Worker(name, cwd, log, start_in_own_group(
                    tune_command(tiny_model, cifar_dir, storage), cwd, env, log)))

            with server.client() as client:
                victim, victim_run = wait_for_creator_mid_trial(client, workers)
                os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait(timeout=30)
            killed_number = int(victim_run.data.tags[Tag.TUNE_TRIAL])
            survivor = next(w for w in workers if w is not victim)
            try:
                survivor.process.wait(timeout=WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the surviving worker did not end within {WORKER_TIMEOUT} s\n{explain(workers)}")
            assert survivor.process.returncode == 0, explain(workers)
        finally:
            stop_process_groups([w.process for w in workers])
        context = explain(workers)
        survivor_log = survivor.log.read_text(errors="replace")
        assert "Traceback" not in survivor_log, context
        assert f"trial {killed_number} failed; retried as a new trial" in survivor_log, context

        # ---- the study: complete, the killed trial FAIL and run again, nothing left running --------------------
        study = optuna.load_study(study_name=STUDY, storage=storage_url(storage))
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name for t in trials)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        # Each worker decides to start a trial from what it reads: both may start the last one at once.
        assert N_TRIALS <= len(finished) <= N_TRIALS + 1, states
        assert not [t for t in trials if t.state == TrialState.RUNNING], states
        killed = next(t for t in trials if t.number == killed_number)
        assert killed.state == TrialState.FAIL, states
        assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed_number], states
        assert killed.user_attrs["worker"].endswith(f":{victim.process.pid}")
        # The kill came in the creator's first trials, with most of the study still to run: the retry (a WAITING
        # trial with the same params, which Optuna hands out before sampling) ran on the survivor.
        retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_number]
        assert len(retries) == 1, [(t.number, t.state.name, t.system_attrs) for t in trials]
        retry = retries[0]
        assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == killed.params
        assert retry.user_attrs["worker"].endswith(f":{survivor.process.pid}")
        parent_id = study.user_attrs[PARENT_RUN_ATTR]

        # ---- the runs: one parent, every trial's run ended, under it, once --------------------------------------
        with server.client() as client:
            experiment = client.get_experiment_by_name(EXPERIMENT)
            runs = search(client, experiment.experiment_id)
            parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_TUNE]
            assert [p.info.run_id for p in parents] == [parent_id]
            parent = parents[0]
            assert parent.info.status == "FINISHED"
            assert parent.data.tags[Tag.TUNE_CREATED_BY].endswith(f":{victim.process.pid}")  # ended by the other
            trial_runs = [r for r in runs if Tag.TUNE_TRIAL in r.data.tags]
            summary = sorted((int(r.data.tags[Tag.TUNE_TRIAL]), r.info.status, r.data.tags[Tag.PID])
                             for r in trial_runs)
            assert {r.info.status for r in trial_runs} <= {"FINISHED", "FAILED"}, summary
            assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status)
                                                                          for r in runs]
            children = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_VARIANT]  # trials and fp32 runs
            assert {r.data.tags.get(Tag.MLFLOW_PARENT) for r in children} == {parent_id}, summary
            assert {r.info.run_id for r in trial_runs} <= {r.info.run_id for r in children}
            numbers = Counter(r.data.tags[Tag.TUNE_TRIAL] for r in trial_runs)
            assert max(numbers.values()) == 1, f"a trial number has two runs: {summary}"
            by_number = {int(r.data.tags[Tag.TUNE_TRIAL]): r for r in trial_runs}
            # Every trial that got as far as measuring has its run, and the run names the trial's storage id.
            for t in trials:
                if t.state in (TrialState.COMPLETE, TrialState.FAIL):
                    assert by_number[t.number].data.tags[Tag.TUNE_TRIAL_ID] == str(t._trial_id), summary
            assert set(by_number) <= {t.number for t in trials}
            killed_run = by_number[killed_number]
            assert killed_run.info.run_id == victim_run.info.run_id
            assert killed_run.info.status == "FAILED", summary
            assert killed_run.data.tags[Tag.STATUS] == Tag.STATUS_FAILED
            assert "stopped sending heartbeats" in killed_run.data.tags[Tag.REASON]
            assert by_number[retry.number].info.status == "FINISHED"
            assert by_number[retry.number].data.tags[Tag.PID] == str(survivor.process.pid)
            # Each worker timed its own FP32 reference, under the same parent.
            fp32 = [r for r in runs if r.data.tags.get(Tag.VARIANT) == "fp32"]
            assert sorted(r.data.tags[Tag.PID] for r in fp32) == sorted(str(w.process.pid) for w in workers)
            assert {r.info.status for r in fp32} == {"FINISHED"}

            # ---- artifacts: through the server, into its --artifacts-destination, none client-side --------------
            assert experiment.artifact_location.startswith("mlflow-artifacts:")
            assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
            downloads = tmp_path / "downloads"
            downloads.mkdir()
            png = Path(client.download_artifacts(parent_id, Artifact.TUNE_PARETO_PLOT, str(downloads)))
            assert png.read_bytes().startswith(b"\x89PNG")
            table = Path(client.download_artifacts(parent_id, Artifact.TUNE_TRIALS_CSV, str(downloads)))
            ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
            assert len(table.read_text().splitlines()) == 1 + len(ended)
            retry_run = by_number[retry.number]
            assert retry_run.info.artifact_uri.startswith("mlflow-artifacts:")
            models = client.search_logged_models([experiment.experiment_id],
                                                 filter_string=f"source_run_id = '{retry_run.info.run_id}'")
            assert models, "the retried trial logged no model"
            import mlflow.artifacts

            model = client.get_logged_model(models[0].model_id)
            assert model.artifact_location.startswith("mlflow-artifacts:")
            model_dir = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=model.artifact_location, dst_path=str(downloads / "model"), tracking_uri=server.url))
            assert (model_dir / "MLmodel").is_file(), sorted(p.name for p in model_dir.iterdir())
        assert any(server.artifacts_dir.rglob("MLmodel"))
        for w in workers:
            for local_store in ("mlruns", "mlflow.db", "optuna.db"):
                assert not (w.cwd / local_store).exists(), f"worker {w.name} wrote {local_store} into its cwd"


# ---- workers ending and stopping at the same moment ------------------------------------------------------------------
# Each worker runs the real `ptqflow tune` in its own process, with a few methods wrapped to hold it at a given point
# until the other worker is there too (files in a shared directory): the interleavings a race needs, made certain.
SYNCED_WORKER = r'''
import os, sys, time
from pathlib import Path

role, sync, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
from ptqflow.pipelines.tune import tuner
from ptqflow.tracking import runs


def mark(name):
    (sync / f"{name}-{os.getpid()}").touch()


def wait_for(name, count, timeout):
    deadline = time.monotonic() + timeout
    while len(list(sync.glob(f"{name}-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def barrier(name, timeout):
    mark(name)
    wait_for(name, 2, timeout)


if role == "together":  # both reach finish() at once, then both would end the parent at once
    real_finish, real_terminate, real_register = tuner.Tuner.finish, runs.terminate, tuner.Tuner._register

    def finish(self, study):
        barrier("finish", 300)
        return real_finish(self, study)

    def terminate(run_id, status):
        if status == "FINISHED":
            barrier("end", 10)
        return real_terminate(run_id, status)

    def register(self, best):
        mark("register")
        return real_register(self, best)

    tuner.Tuner.finish, runs.terminate, tuner.Tuner._register = finish, terminate, register
elif role == "stops":  # Ctrl-C in its first trial, once the other worker is between trials
    real_abandon = tuner.Tuner._abandon

    def objective(self, trial):
        wait_for("between", 1, 300)
        raise KeyboardInterrupt

    def abandon(self, study):
        real_abandon(self, study)
        mark("abandoned")

    tuner.Tuner.objective, tuner.Tuner._abandon = objective, abandon
elif role == "between":  # has joined and made its FP32 reference; starts its trials once the other has stopped
    real_loop = tuner.Tuner._loop

    def loop(self, study):
        mark("between")
        wait_for("abandoned", 1, 300)
        return real_loop(self, study)

    tuner.Tuner._loop = loop
from ptqflow.pipelines.cli.app import app

app(args, prog_name="ptqflow")
'''


def start_synced_workers(roles: tuple[str, ...], study: str, experiment: str, model: Path, data_dir: Path,
                         storage: str, server, tmp_path: Path, *extra: str) -> list[Worker]:
    sync = tmp_path / "sync"
    sync.mkdir()
    workers = []
    for number, role in enumerate(roles):
        name = f"{role}-{number}"
        cwd = tmp_path / f"worker-{name}"
        cwd.mkdir()
        env = server.client_env()
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
        env["XDG_CACHE_HOME"] = str(tmp_path / f"cache-{name}")
        command = [sys.executable, "-c", SYNCED_WORKER, role, str(sync), "tune", "--model", str(model), "--data-dir",
                   str(data_dir), "--experiment", experiment, "--study", study, "--storage", storage,
                   "--calibration-sizes", "50,100", "--adaround-iterations", str(ADAROUND_ITERATIONS),
                   "--heartbeat", str(HEARTBEAT_S), "--timeout", "900", "--target-agreement", "0.9",
                   "--min-speedup", "0", *extra]
        log = tmp_path / f"worker-{name}.log"
        workers.append(Worker(name, cwd, log, start_in_own_group(command, cwd, env, log)))
    return workers


def wait_all(workers: list[Worker]) -> None:
    try:
        for w in workers:
            try:
                w.process.wait(timeout=WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {w.name} did not end within {WORKER_TIMEOUT} s\n{explain(workers)}")
    finally:
        stop_process_groups([w.process for w in workers])


def parent_and_runs(server, experiment_name: str):
    with server.client() as client:
        experiment = client.get_experiment_by_name(experiment_name)
        runs = search(client, experiment.experiment_id)
    [parent] = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_TUNE]
    return parent, runs


def test_two_workers_finishing_together_end_the_study_once_and_register_once(postgres, tiny_model, cifar_dir,
                                                                            tmp_path):  # noqa: F811
    """Both workers look at the study at the same moment, see no other at work and would end the parent run and
    register the best trial: the claim in the study's database lets exactly one do it."""
    storage = postgres.create_database("optuna")
    with start_tracking_server(postgres, tmp_path / "server") as server:
        workers = start_synced_workers(("together", "together"), "together", "tune-together", tiny_model,
                                       cifar_dir, storage, server, tmp_path, "--n-trials", "2")
        wait_all(workers)
        context = explain(workers)
        assert [w.process.returncode for w in workers] == [0, 0], context
        assert len(list((tmp_path / "sync").glob("finish-*"))) == 2, context  # both were in finish() together
        registered = list((tmp_path / "sync").glob("register-*"))
        assert len(registered) == 1, f"{len(registered)} workers registered the best trial\n{context}"
        parent, runs = parent_and_runs(server, "tune-together")
    assert parent.info.status == "FINISHED"
    ender_pid = registered[0].name.removeprefix("register-")
    assert parent.data.tags[Tag.TUNE_ENDED_BY].split(" at ")[0].endswith(f":{ender_pid}"), parent.data.tags
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_worker_stopped_while_another_is_between_trials_leaves_the_study_running(postgres, tiny_model, cifar_dir,
                                                                                  tmp_path):  # noqa: F811
    """Ctrl-C on one worker while the other has joined (its FP32 reference made) but runs no trial: the parent run
    stays RUNNING for the other, which runs its trials under it and ends it FINISHED."""
    storage = postgres.create_database("optuna")
    with start_tracking_server(postgres, tmp_path / "server") as server:
        workers = start_synced_workers(("stops", "between"), "stopped", "tune-stopped", tiny_model, cifar_dir,
                                       storage, server, tmp_path, "--n-trials", "2", "--no-register")
        wait_all(workers)
        context = explain(workers)
        stopped, other = workers
        assert stopped.process.returncode != 0 and other.process.returncode == 0, context
        assert list((tmp_path / "sync").glob("abandoned-*")), context
        parent, runs = parent_and_runs(server, "tune-stopped")
    assert parent.info.status == "FINISHED", f"{parent.info.status}: {parent.data.tags}\n{context}"
    assert parent.data.tags[Tag.TUNE_ENDED_BY].split(" at ")[0].endswith(f":{other.process.pid}")
    trials = [r for r in runs if Tag.TUNE_TRIAL in r.data.tags]
    assert [r.info.status for r in trials if r.data.tags[Tag.PID] == str(other.process.pid)] == ["FINISHED"], context
    assert not [r for r in runs if r.info.status == "RUNNING"]
