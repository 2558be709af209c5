"""`ptqflow serve` on the champion: the registered TorchScript model, SHA-256-verified and loaded under its
quantized engine, answers REST requests with the same predictions as the file itself; a changed file, an unknown
alias or a port in use is one `error:` line and nothing listening.

A small sweep (always-pass gate, so `resnet8-int8@champion` exists) goes into a temp sqlite store; the model server
runs as a subprocess in its own process group on a free 127.0.0.1 port and is killed with its group at teardown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, seed_mlflow_store
from processes import HOST, free_port, start_in_own_group, stop_process_groups, wait_ready

pytestmark = pytest.mark.server

MODEL = "resnet8-int8"
ALIAS = "champion"
START_TIMEOUT = 90.0
BATCH = 16  # real fixture test images per request


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, cifar_dir, tiny_model):
    """A sweep into a fresh sqlite store with the always-pass gate; yields (tracking URI, store dir)."""
    import mlflow

    from ptqflow.pipelines.registry.gate import GatePolicy
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    root = tmp_path_factory.mktemp("serve_store")
    uri = f"sqlite:///{seed_mlflow_store(root)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # ./mlruns (the artifact root) lands in the temp dir
        mlflow.set_tracking_uri(uri)
        try:
            run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                   variants=("pytorch-fx-int8",), bench=False, adaround_iterations=ADAROUND_ITERATIONS,
                                   gate=GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0, allow_slower=True)))
            yield uri, root
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


def _env(uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("PTQFLOW_DEBUG", None)  # errors must be the user's one line, not a traceback
    return env


def _serve_cmd(ref: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ptqflow", "serve", ref, "--host", HOST, "--port", str(port), *extra]


def _run_serve(champion_store, ref: str, port: int) -> subprocess.CompletedProcess:
    """`ptqflow serve` expected to fail: run it to its end (a hang is a failure too)."""
    uri, root = champion_store
    return subprocess.run(_serve_cmd(ref, port), cwd=root, env=_env(uri), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=START_TIMEOUT)


def _assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "serving" not in result.stdout, result.stdout
    return errors[0]


def _nothing_listens(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        assert s.connect_ex((HOST, port)) != 0, f"something answers on {HOST}:{port}"


@pytest.fixture(scope="module")
def model_server(champion_store):
    """`ptqflow serve resnet8-int8@champion` (download, SHA-256 check, engine, MLflow's scoring server in-process);
    yields (base URL, its log)."""
    uri, root = champion_store
    port = free_port()
    log = root / "ptqflow-serve.log"
    process = start_in_own_group(_serve_cmd(f"{MODEL}@{ALIAS}", port), root, _env(uri), log)
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, process, log, START_TIMEOUT, probes=("/ping", "/health"), what="ptqflow serve")
        yield url, log
    finally:
        stop_process_groups([process])


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST {url} -> {exc.code}: {exc.read()[:500]!r}") from exc


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_served_champion_predicts_like_the_registered_torchscript(champion_store, model_server, cifar_dir,
                                                                  tmp_path):
    import torch
    url, log = model_server

    from ptqflow.common.files import file_sha256
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.tracking.keys import VersionTag
    from ptqflow.tracking.registry import download, resolve

    version = resolve(MODEL, alias=ALIAS)
    assert ALIAS in version.aliases
    model_dir = download(version, tmp_path / "champion")
    model_file = model_dir / version.tags[VersionTag.MODEL_FILE]
    assert file_sha256(model_file) == version.tags[VersionTag.SHA256]

    # Before serving, one line says where, which file (verified SHA-256 prefix) and under which engine.
    announced = [line for line in log.read_text().splitlines() if line.startswith("serving ")]
    assert len(announced) == 1, log.read_text()[-2000:]
    engine = version.tags.get(VersionTag.QUANTIZED_ENGINE)
    assert engine, "the sweep should tag the version with its quantized engine"
    for fragment in (f"{MODEL} version {version.version}", f" at {url} ",
                     f"sha256 {version.tags[VersionTag.SHA256][:12]}…, verified", f"engine {engine}"):
        assert fragment in announced[0], announced[0]

    # The request format MLflow itself recorded for this model: {"inputs": <NHWC float32 batch>}.
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert set(example) == {"inputs"}
    example_batch = np.asarray(example["inputs"], dtype=np.float32)
    assert example_batch.shape[1:] == (32, 32, 3)

    test = load_cifar10(cifar_dir).test
    picks = np.random.default_rng(0).choice(len(test.labels), size=BATCH, replace=False)
    images = test.images[picks].transpose(0, 2, 3, 1).astype(np.float32)  # NCHW uint8 -> NHWC raw 0..255
    assert images.shape == (BATCH, 32, 32, 3) and images.max() > 1.0

    body = _post_json(f"{url}/invocations", {"inputs": images.tolist()})
    served = np.asarray(body["predictions"] if isinstance(body, dict) else body, dtype=np.float32)
    assert served.shape == (BATCH, 10), f"unexpected response shape {served.shape}: {str(body)[:300]}"
    assert np.isfinite(served).all()

    # The same file, loaded directly, under the engine its accuracy was measured with.
    previous_engine = torch.backends.quantized.engine
    engine = version.tags.get(VersionTag.QUANTIZED_ENGINE)
    try:
        if engine and engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = engine
        module = torch.jit.load(str(model_file), map_location="cpu").eval()
        with torch.no_grad():
            local = module(torch.from_numpy(images)).numpy()
    finally:
        torch.backends.quantized.engine = previous_engine
    assert local.shape == (BATCH, 10)
    np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
    np.testing.assert_allclose(served, local, atol=1e-5)

    # The recorded example is accepted as-is too (the README's curl command posts that file).
    example_body = _post_json(f"{url}/invocations", example)
    assert np.asarray(example_body["predictions"]).shape == (len(example_batch), 10)


def test_serve_refuses_a_changed_registered_file(champion_store):
    """The champion's file in the artifact store is changed after registration: serve says so in one line, exits
    non-zero, and never listens (the server is only started after the check)."""
    from mlflow.tracking import MlflowClient

    from ptqflow.tracking.keys import VersionTag
    from ptqflow.tracking.registry import resolve

    version = resolve(MODEL, alias=ALIAS)
    source = MlflowClient().get_model_version_download_uri(MODEL, version.version)
    stored = Path(source.removeprefix("file://")) / version.tags[VersionTag.MODEL_FILE]
    assert stored.is_file(), f"registered file not found at {stored} (download URI {source})"
    original = stored.read_bytes()
    port = free_port()
    try:
        stored.write_bytes(original + b"tampered")
        result = _run_serve(champion_store, f"{MODEL}@{ALIAS}", port)
    finally:
        stored.write_bytes(original)
    line = _assert_one_error_line(result, "SHA-256", "refusing to load")
    assert version.tags[VersionTag.SHA256][:12] in line
    _nothing_listens(port)


@pytest.mark.parametrize("ref, fragment", [(f"{MODEL}@no-such-alias", "no alias 'no-such-alias'"),
                                           ("no-such-model@champion", "'no-such-model'")])
def test_serve_refuses_an_unknown_model_or_alias(champion_store, ref, fragment):
    port = free_port()
    _assert_one_error_line(_run_serve(champion_store, ref, port), fragment)
    _nothing_listens(port)


def test_serve_refuses_a_port_in_use(champion_store):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        _assert_one_error_line(_run_serve(champion_store, f"{MODEL}@{ALIAS}", port), f"{HOST}:{port}", "in use")
