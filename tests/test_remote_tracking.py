"""A team's shared tracking server: `mlflow server` on PostgreSQL (with proxied artifacts, with basic auth), and
concurrent sweeps against it and against a sqlite store. Every sweep and pull runs as its own `python -m
ptqflow.pipelines.cli.app` process, the way team members' machines would; the checks read the server back through MlflowClient.
Sweeps run two variants (one per registered model) without benchmarks, to stay within a few minutes.

Skipped when the PostgreSQL binaries or the drivers are missing; `bash .ci/services.sh` installs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import CALIBRATION_SIZE
from servers import (  # noqa: F401  (fixtures)
    TrackingServer,
    auth_tracking_server,
    pg_tracking_server,
    postgres,
    tracking_servers,
)

from ptqflow.tracking.keys import Tag, VersionTag

pytestmark = pytest.mark.server

SWEEP_TIMEOUT = 300
# One variant per registered model: every sweep registers two versions and stays short on 2 shared cores.
VARIANTS = ("pytorch-fx-int8", "ort-int8")


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "ptqflow", *(str(a) for a in args)]


def sweep_args(model: Path, data_dir: Path, experiment: str, registered: str) -> list:
    return ["sweep", "--model", model, "--data-dir", data_dir, "--calibration-size", CALIBRATION_SIZE, "--no-bench",
            "--weight-rounding", "nearest",
            "--experiment", experiment, "--registered-model", registered, "--registered-onnx-model",
            f"{registered}-onnx", *(f"--variant={v}" for v in VARIANTS)]


def run_cli(args: list, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT, stdin=subprocess.DEVNULL)


def start_cli(args: list, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=SWEEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def experiment_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id], max_results=1000)


def assert_sweeps_consistent(runs: list, sweeps: int, variants: tuple[str, ...] = VARIANTS) -> list:
    """`sweeps` complete sweeps, each child under its own sweep's parent; returns the parent runs."""
    parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP]
    children = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_VARIANT]
    assert len(parents) == sweeps and len(runs) == sweeps * (2 + len(variants)), [r.info.run_name for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    parent_ids = {p.info.run_id for p in parents}
    per_parent = Counter(c.data.tags.get(Tag.MLFLOW_PARENT) for c in children)
    assert per_parent == {pid: 1 + len(variants) for pid in parent_ids}, per_parent
    pid_of = {p.info.run_id: p.data.tags[Tag.PID] for p in parents}
    for child in children:
        parent_id = child.data.tags[Tag.MLFLOW_PARENT]
        # The sweep's own record of its parent, and the process that logged the child, agree with MLflow's tag.
        assert child.data.tags[Tag.SWEEP_RUN_ID] == parent_id
        assert child.data.tags[Tag.PID] == pid_of[parent_id]
    assert sorted(c.data.tags[Tag.VARIANT] for c in children) == sorted(["fp32", *variants] * sweeps)
    return parents


# ---- PostgreSQL-backed server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def team_sweeps(pg_tracking_server: TrackingServer, tiny_model, cifar_dir, tmp_path_factory):
    """Two sweeps started at the same moment by two processes against the server; neither the experiment nor the
    registered models exist yet, so they race to create them too."""
    cwd = tmp_path_factory.mktemp("team_sweeps")
    args = sweep_args(tiny_model, cifar_dir, "team", "team-int8")
    processes = [start_cli(args, pg_tracking_server.client_env(), cwd) for _ in range(2)]
    return [finish(p) for p in processes], cwd


def test_two_concurrent_sweeps_on_postgres_server(pg_tracking_server: TrackingServer, team_sweeps):
    server = pg_tracking_server
    results, cwd = team_sweeps
    for result in results:
        assert result.returncode == 0, explain(result)

    with server.client() as client:
        parents = assert_sweeps_consistent(experiment_runs(client, "team"), sweeps=2)
        for name in ("team-int8", "team-int8-onnx"):
            versions = client.search_model_versions(f"name = '{name}'")
            assert sorted(int(v.version) for v in versions) == [1, 2]
            owners = {client.get_run(v.run_id).data.tags[Tag.MLFLOW_PARENT] for v in versions}
            assert owners == {p.info.run_id for p in parents}, "each sweep registered its own version"
            for v in versions:
                assert v.run_id and v.tags[VersionTag.SHA256]
        assert client.get_experiment_by_name("team").artifact_location.startswith("mlflow-artifacts:")
    # The artifacts went through the server into its --artifacts-destination; nothing was stored client-side.
    assert len(list(server.artifacts_dir.rglob("model.pt"))) == 2
    assert not (cwd / "mlruns").exists() and not (cwd / "mlflow.db").exists()


def test_pull_from_another_process(pg_tracking_server: TrackingServer, team_sweeps, cifar_dir, tmp_path):
    for result in team_sweeps[0]:
        assert result.returncode == 0, explain(result)
    pulled = tmp_path / "pulled"
    pull = run_cli(["pull", "team-int8", "--version", "1", "--evaluate", "--data-dir", cifar_dir, "--output", pulled],
                   pg_tracking_server.client_env(), tmp_path)
    assert pull.returncode == 0, explain(pull)
    assert "team-int8 version 1: " in pull.stdout and "matches the registered" in pull.stdout, pull.stdout
    model_file = Path(pull.stdout.split("team-int8 version 1: ", 1)[1].split(" (sha256", 1)[0])
    assert model_file.is_file() and pulled in model_file.parents


# ---- basic auth --------------------------------------------------------------------------------------------------
def all_run_ids(server: TrackingServer) -> set[str]:
    with server.admin_client() as client:
        return {r.info.run_id for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id], max_results=1000)}


def test_basic_auth_sweep_with_right_credentials(auth_tracking_server: TrackingServer, tiny_model, cifar_dir,
                                                 tmp_path):
    server = auth_tracking_server
    env = server.client_env(server.user, server.user_password)
    result = run_cli(sweep_args(tiny_model, cifar_dir, "auth-team", "auth-int8"), env, tmp_path)
    assert result.returncode == 0, explain(result)
    assert server.user_password not in result.stdout + result.stderr
    with server.admin_client() as client:
        runs = experiment_runs(client, "auth-team")
        assert_sweeps_consistent(runs, sweeps=1)
        assert {r.info.user_id for r in runs} == {server.user}  # the server recorded who logged them
        assert client.get_model_version("auth-int8", "1")


@pytest.mark.parametrize("credentials", ["wrong-password", "none"])
def test_basic_auth_refuses_bad_credentials_in_one_line(auth_tracking_server: TrackingServer, tiny_model, cifar_dir,
                                                        tmp_path, credentials):
    server = auth_tracking_server
    wrong = "not-the-" + server.user_password
    if credentials == "none":
        env, shown = server.client_env(), "(none)"
    else:
        env, shown = server.client_env(server.user, wrong), server.user
    before = all_run_ids(server)
    result = run_cli(sweep_args(tiny_model, cifar_dir, "auth-refused", "refused-int8"), env, tmp_path)

    assert result.returncode != 0, explain(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, explain(result)
    assert lines[0].startswith("error: ")
    assert f"tracking server refused the credentials for user {shown}" in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    for secret in (wrong, server.user_password, server.admin_password):
        assert secret not in result.stdout + result.stderr
    assert all_run_ids(server) == before, "a refused sweep created runs"
    with server.admin_client() as client:
        assert client.get_experiment_by_name("auth-refused") is None


def test_pull_with_bad_credentials_is_refused_in_one_line(auth_tracking_server: TrackingServer, cifar_dir, tmp_path):
    server = auth_tracking_server
    wrong = "wrong-" + server.user_password
    result = run_cli(["pull", "auth-int8", "--version", "1", "--output", tmp_path / "pulled"],
                     server.client_env(server.user, wrong), tmp_path)
    assert result.returncode != 0, explain(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"refused the credentials for user {server.user}" in lines[0], explain(result)
    assert wrong not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pulled").exists() or not any((tmp_path / "pulled").rglob("*.pt"))


# ---- sqlite ------------------------------------------------------------------------------------------------------
def test_two_concurrent_sweeps_on_one_sqlite_store(tiny_model, cifar_dir, tmp_path):
    """sqlite allows one writer at a time: both sweeps must still complete (waiting, with a message, if need be),
    never crash with 'database is locked'."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    args = sweep_args(tiny_model, cifar_dir, "local", "local-int8")
    processes = [start_cli(args, env, tmp_path) for _ in range(2)]
    results = [finish(p) for p in processes]
    for result in results:
        assert result.returncode == 0, explain(result)
        assert "database is locked" not in result.stdout + result.stderr, explain(result)
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, explain(result)
    waited = [r for r in results if "waiting for another process to finish setting up the sqlite store" in r.stderr]
    assert len(waited) <= 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert_sweeps_consistent(experiment_runs(client, "local"), sweeps=2)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'local-int8'")) == [1, 2]
