"""Registered TorchScript int8 models load under their version's `quantized_engine` tag: `pull`, `bench` on
registered versions and `serve` set torch's quantized engine from the tag before loading.

A small FX-quantized TorchScript module is registered in a fresh sqlite store, once per engine, with the engine
tag set by the test itself (no sweep: fast).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.[a-z_]+` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
              pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
              pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning")]

MODEL = "engine-test-int8"
ENGINES = ("fbgemm", "x86")


def _int8_torchscript(engine: str):
    """A tiny NHWC 32x32x3 -> 10 classifier, FX static int8 for `engine`, traced to TorchScript."""
    import torch
    from torch import nn
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)
            self.fc = nn.Linear(4 * 15 * 15, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x.permute(0, 3, 1, 2))).flatten(1))

    torch.manual_seed(0)
    example = torch.rand(2, 32, 32, 3) * 255
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        prepared = prepare_fx(Tiny().eval(), get_default_qconfig_mapping(engine), example_inputs=(example,))
        with torch.no_grad():
            prepared(example)
            traced = torch.jit.trace(convert_fx(prepared), example)
            out = traced(example)
    finally:
        torch.backends.quantized.engine = previous
    return traced, example.numpy(), out.numpy()


def _register(tmp_path, engine: str) -> str:
    """Log the module as ptqflow logs its variants and register it with ptqflow's tags; returns the version."""
    import mlflow

    from ptqflow.common.files import file_sha256
    from ptqflow.tracking import registry
    from ptqflow.tracking.keys import VersionTag as V
    from ptqflow.tracking.logged_models import log_torchscript_model

    module, example, output = _int8_torchscript(engine)
    with mlflow.start_run():
        logged = log_torchscript_model(module, f"tiny-{engine}", tmp_path / f"model-{engine}", example, output,
                                       pip_requirements=["torch"], params={})
    tags = {V.SHA256: file_sha256(logged.model_file), V.MODEL_FILE: logged.model_file_in_model}
    version = registry.register(logged.model_uri, MODEL, tags).version
    # The engine tag is set here, not trusted from the sweep's own tagging (tested elsewhere).
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(MODEL, version, V.QUANTIZED_ENGINE, engine)
    return version


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, str]:
    """A fresh sqlite store holding one registered version per engine; yields {engine: version}."""
    import mlflow
    from conftest import _point_mlflow_at

    root = tmp_path_factory.mktemp("engine_store")
    with pytest.MonkeyPatch.context() as mp:
        _point_mlflow_at(mp, root)
        try:
            yield {engine: _register(root, engine) for engine in ENGINES}
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


@pytest.fixture()
def restore_engine():
    import torch

    previous = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = previous


def _other(engine: str) -> str:
    return next(e for e in ENGINES if e != engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_pull_loads_under_the_versions_engine(versions, tmp_path, restore_engine, engine):
    import torch

    from ptqflow.pipelines.registry.pull import pull

    version = versions[engine]
    torch.backends.quantized.engine = _other(engine)  # so only pull can have set it
    result = pull(MODEL, version, None, tmp_path / "pulled")
    assert torch.backends.quantized.engine == engine
    assert result.engine == engine and result.version == version
    assert result.model_dir is not None and (result.model_dir / "MLmodel").is_file()
    assert result.model_file.parent.parent == result.model_dir


def test_bench_targets_take_the_versions_engine_and_files_the_engine_before_pulling(versions, tmp_path,
                                                                                   restore_engine):
    import torch

    from ptqflow.models.runtime.latency import BenchConfig
    from ptqflow.pipelines.sweep.bench import bench_files, resolve_targets
    from ptqflow.pipelines.registry.pull import pull

    fbgemm, x86 = versions["fbgemm"], versions["x86"]
    file = pull(MODEL, x86, None, tmp_path / "file").model_file  # a TorchScript file outside the registry
    torch.backends.quantized.engine = "x86"
    targets = resolve_targets([f"{MODEL}/{fbgemm}", str(file), f"{MODEL}/{x86}"], tmp_path / "pulled", None, "raw")
    # The file was resolved after pulling the fbgemm version, yet keeps the engine torch had at the start.
    assert [t.engine for t in targets] == ["fbgemm", "x86", "x86"]
    explicit = resolve_targets([str(file)], tmp_path / "pulled", None, "raw", engine="fbgemm")
    assert explicit[0].engine == "fbgemm"

    # bench_files loads each target under its own engine.
    seen = []
    import ptqflow.models.runtime.runners as runtime

    real = runtime.TorchRunner.from_torchscript

    def spy(path, engine=None):
        runner = real(path, engine)
        seen.append((engine, torch.backends.quantized.engine))
        return runner

    images = (np.random.default_rng(0).random((4, 3, 32, 32)) * 255).astype(np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.TorchRunner, "from_torchscript", staticmethod(spy))
        bench_files(targets[:2], images, BenchConfig(warmup_runs=1, latency_runs=2, throughput_runs=1, threads=1))
    assert set(seen) == {("fbgemm", "fbgemm"), ("x86", "x86")}


def test_pull_refuses_an_engine_this_torch_lacks(versions, tmp_path, restore_engine):
    from mlflow.tracking import MlflowClient

    from ptqflow.common.errors import ModelError
    from ptqflow.pipelines.registry.pull import pull
    from ptqflow.tracking.keys import VersionTag as V

    version = versions["fbgemm"]
    client = MlflowClient()
    client.set_model_version_tag(MODEL, version, V.QUANTIZED_ENGINE, "no-such-engine")
    try:
        with pytest.raises(ModelError, match="'no-such-engine' engine"):
            pull(MODEL, version, None, tmp_path / "pulled")
    finally:
        client.set_model_version_tag(MODEL, version, V.QUANTIZED_ENGINE, "fbgemm")


@pytest.mark.parametrize("engine", ENGINES)
def test_serve_loads_the_verified_copy_under_the_versions_engine(versions, tmp_path, restore_engine, engine):
    """What `ptqflow serve` hands to MLflow's scoring server: the downloaded copy, loaded under the tag's engine."""
    import torch

    from ptqflow.pipelines.registry.serve import load_verified, scoring_app

    version = versions[engine]
    torch.backends.quantized.engine = _other(engine)
    served = load_verified(MODEL, version, None, tmp_path / "served")
    assert torch.backends.quantized.engine == engine and served.engine == engine
    assert served.model_dir.is_relative_to(tmp_path / "served")
    images = (np.random.default_rng(1).random((3, 32, 32, 3)) * 255).astype(np.float32)
    direct = torch.jit.load(str(served.model_file)).eval()
    with torch.no_grad():
        expected = direct(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.asarray(served.pyfunc.predict(images)), expected, atol=1e-5)
    assert scoring_app(served) is not None
