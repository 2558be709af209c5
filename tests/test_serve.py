"""`mlflow models serve` on the champion: the registered TorchScript model answers REST requests with the same
predictions as the file itself.

A small sweep (always-pass gate, so `resnet8-int8@champion` exists) goes into a temp sqlite store; the model server
runs as a subprocess in its own process group on a free 127.0.0.1 port and is killed with its group at teardown.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import CALIBRATION_SIZE
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

    from pipelines.promotion import GatePolicy
    from pipelines.sweep import SweepOptions, run_sweep

    root = tmp_path_factory.mktemp("serve_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # ./mlruns (the artifact root) lands in the temp dir
        mlflow.set_tracking_uri(uri)
        try:
            run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                   variants=("pytorch-fx-int8",), bench=False,
                                   gate=GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0)))
            yield uri, root
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def model_server(champion_store):
    """`mlflow models serve -m models:/resnet8-int8@champion --env-manager local`; yields its base URL."""
    uri, root = champion_store
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    log = root / "models-serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@{ALIAS}", "--env-manager",
           "local", "--host", HOST, "--port", str(port)]
    process = start_in_own_group(cmd, root, env, log)
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, process, log, START_TIMEOUT, probes=("/ping", "/health"), what="mlflow models serve")
        yield url
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

    from models.onnx_model import file_sha256
    from pipelines.cifar import load_cifar10
    from tracking.keys import VersionTag
    from tracking.registry import download, resolve

    version = resolve(MODEL, alias=ALIAS)
    assert ALIAS in version.aliases
    model_dir = download(version, tmp_path / "champion")
    model_file = model_dir / version.tags[VersionTag.MODEL_FILE]
    assert file_sha256(model_file) == version.tags[VersionTag.SHA256]

    # The request format MLflow itself recorded for this model: {"inputs": <NHWC float32 batch>}.
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert set(example) == {"inputs"}
    example_batch = np.asarray(example["inputs"], dtype=np.float32)
    assert example_batch.shape[1:] == (32, 32, 3)

    test = load_cifar10(cifar_dir).test
    picks = np.random.default_rng(0).choice(len(test.labels), size=BATCH, replace=False)
    images = test.images[picks].transpose(0, 2, 3, 1).astype(np.float32)  # NCHW uint8 -> NHWC raw 0..255
    assert images.shape == (BATCH, 32, 32, 3) and images.max() > 1.0

    body = _post_json(f"{model_server}/invocations", {"inputs": images.tolist()})
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
    example_body = _post_json(f"{model_server}/invocations", example)
    assert np.asarray(example_body["predictions"]).shape == (len(example_batch), 10)
