"""A tracking server that goes away mid-sweep: the sweep stops with one clear line; `--resume` after the server
is back completes it without redoing the variants that had finished."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import CALIBRATION_SIZE
from processes import HOST, free_port, start_in_own_group, stop_process_groups, wait_ready

from ptqflow.tracking.keys import Tag

pytestmark = pytest.mark.server


def _start_server(root, port):
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", HOST, "--port", str(port),
           "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log = root / f"server-{time.monotonic_ns()}.log"
    process = start_in_own_group(cmd, root, env, log)
    wait_ready(f"http://{HOST}:{port}", process, log, 90, what="mlflow server")
    return process


def _runs(url):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=500)]


def test_sweep_survives_a_server_outage_and_resumes(tmp_path, tiny_model, cifar_dir):
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    args = [sys.executable, "-m", "ptqflow", "sweep", "--model", str(tiny_model), "--data-dir", str(cifar_dir),
            "--calibration-size", str(CALIBRATION_SIZE), "--weight-rounding", "nearest", "--no-bench",
            "--no-register"]
    server = _start_server(tmp_path, port)
    try:
        sweep = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                r.info.run_name == "pytorch-fx-int8" and r.info.status == "FINISHED" for r in _runs(url)):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.2)
    finally:
        stop_process_groups([server])
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume" in errors[0], stderr
    # The variant that could not be recorded stopped the sweep: no variant after it counted as a failed variant.
    assert not [line for line in stderr.splitlines() if "✗" in line], stderr

    server = _start_server(tmp_path, port)
    try:
        resumed = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        runs = _runs(url)
        fx_runs = [r for r in runs if r.info.run_name == "pytorch-fx-int8"]
        assert len(fx_runs) == 1 and fx_runs[0].info.status == "FINISHED"  # reused, not redone
        parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP]
        latest = max(parents, key=lambda r: r.info.start_time)
        assert latest.info.status == "FINISHED"
        assert latest.data.tags[Tag.REUSED_FROM + "pytorch-fx-int8"] == fx_runs[0].info.run_id
        # What the lost connection left RUNNING was marked FAILED by the resumed sweep (its process is gone).
        assert not [r for r in runs if r.info.status == "RUNNING"]
    finally:
        stop_process_groups([server])
