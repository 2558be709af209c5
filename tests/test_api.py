"""The Python API (pipelines/api.py), used the way a notebook would: quantize, look at the numbers, load a file.

Small and fast: the tiny fixtures, 50 test images, nearest rounding, benchmarks only where latency is checked."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import CALIBRATION_SIZE
from mlflow.tracking import MlflowClient

from ptqflow.common.errors import ConfigError
from ptqflow.common.files import file_sha256
from ptqflow.pipelines.api import quantize
from ptqflow.tracking.keys import Metric, Param, Tag

FAST = {"calibration_size": CALIBRATION_SIZE, "test_limit": 50, "weight_rounding": "nearest"}


def _nothing_tracked(*directories) -> None:
    """No sqlite store, no mlruns directory, no run: checked on disk first (a search would create the store)."""
    for directory in directories:
        assert not (directory / "mlflow.db").exists() and not (directory / "mlruns").exists(), directory
    assert mlflow.active_run() is None
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0


def _predict_one(model_file, engine=None):
    from ptqflow.models.runtime.runners import load_runner

    runner = load_runner(model_file, engine=engine)
    return np.asarray(runner.predict(np.zeros((1, 32, 32, 3), np.float32)))


def test_untracked_quantize_returns_numbers_and_files_and_writes_nothing_to_mlflow(untouched_tracking_dir, tiny_model,
                                                                                     cifar_dir, monkeypatch):
    # Any MLflow call would start a run: make that impossible, so "untracked" is proven, not assumed.
    monkeypatch.setattr(mlflow, "start_run", lambda *a, **k: pytest.fail("track=False started an MLflow run"))

    results = quantize(tiny_model, cifar_dir, variants=["ort-int8", "pytorch-fx-int8", "pytorch-fx-uint8"],
                       track=False, bench=False, **FAST)

    # One report per variant, the FP32 reference first.
    assert [r.name for r in results] == ["fp32", "ort-int8", "pytorch-fx-int8", "pytorch-fx-uint8"]
    assert results.parent_run_id is None and all(r.run_id is None for r in results)
    fp32 = results["fp32"]
    assert fp32.status == "ok" and fp32.agreement == 1.0 and fp32.model_file == tiny_model
    for name in ("ort-int8", "pytorch-fx-int8"):
        r = results[name]
        assert r.status == "ok" and not r.reason
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.agreement <= 1.0
        assert r.latency_ms is None  # bench=False
        # The file exists where the result says, has the reported size, and loads and runs.
        assert r.model_file.is_file() and r.model_file.parent == results.output_dir / name
        assert r.size_bytes == r.model_file.stat().st_size
        assert (r.model_file.parent / "qconfig.json").is_file()
        engine = "fbgemm" if name.startswith("pytorch") else None
        assert _predict_one(r.model_file, engine).shape == (1, 10)
    assert results["ort-int8"].model_file.name == "model.onnx"
    assert results["pytorch-fx-int8"].model_file.name == "model.pt"
    # The variant fbgemm refuses is reported with the library's reason, not raised.
    uint8 = results["pytorch-fx-uint8"]
    assert uint8.status == "unsupported" and uint8.reason and uint8.model_file is None and uint8.accuracy is None

    # Nothing tracked: no store in the working directory (the fixture's tracking dir) or in the output directory.
    monkeypatch.undo()
    _nothing_tracked(untouched_tracking_dir, results.output_dir)

    # The default output directory is temporary: it lives as long as the result, or until cleanup().
    output_dir = results.output_dir
    results.cleanup()
    assert not output_dir.exists()


def test_untracked_quantize_into_a_chosen_directory_with_latency(untouched_tracking_dir, tiny_model, cifar_dir,
                                                                 tmp_path):
    out = tmp_path / "quantized"
    results = quantize(str(tiny_model), str(cifar_dir), variants="ort-int8-u8s8", track=False, output_dir=out,
                       **FAST)
    r = results["ort-int8-u8s8"]
    assert r.status == "ok" and r.model_file == out / "ort-int8-u8s8" / "model.onnx"
    assert r.latency_ms > 0 and results["fp32"].latency_ms > 0
    results.cleanup()  # a chosen directory is the caller's: it stays
    assert r.model_file.is_file()
    _nothing_tracked(untouched_tracking_dir, out)


def test_bad_options_are_config_errors_before_any_work(untouched_tracking_dir, tiny_model, cifar_dir):
    with pytest.raises(ConfigError, match="experiment only apply to tracked runs"):
        quantize(tiny_model, cifar_dir, track=False, experiment="elsewhere")
    with pytest.raises(ConfigError, match="no option calibration_sise"):
        quantize(tiny_model, cifar_dir, track=False, calibration_sise=100)
    with pytest.raises(ConfigError, match="unknown variant 'ort-int3'"):
        quantize(tiny_model, cifar_dir, variants=["ort-int3"], track=False, **FAST)
    _nothing_tracked(untouched_tracking_dir)


def test_tracked_quantize_is_the_sweep_and_returns_what_mlflow_recorded(tracking_store, tiny_model, cifar_dir):
    results = quantize(tiny_model, cifar_dir, variants=["ort-int8", "pytorch-fx-int8-x86"], bench=False, **FAST)

    # The same runs as `ptqflow sweep`: one parent, one child per variant (FP32 included), FINISHED.
    client = MlflowClient()
    parent = client.get_run(results.parent_run_id)
    assert parent.data.tags[Tag.ROLE] == Tag.ROLE_SWEEP and parent.info.status == "FINISHED"
    assert parent.data.params[Param.VARIANTS] == "ort-int8,pytorch-fx-int8-x86"
    assert parent.data.params[Param.TEST_LIMIT] == "50"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{Tag.SWEEP_RUN_ID}` = '{results.parent_run_id}'")
    assert {c.info.run_id for c in children} == {r.run_id for r in results}

    # Each report equals its run's metrics and tags, read back from MLflow.
    for r in results:
        run = client.get_run(r.run_id)
        metrics = run.data.metrics
        assert run.info.run_name == r.name and run.data.params[Param.VARIANT] == r.name
        assert r.status == "ok" and run.data.tags[Tag.STATUS] == Tag.STATUS_OK
        assert metrics[Metric.ACCURACY] == r.accuracy
        assert metrics[Metric.TOP1_AGREEMENT] == r.agreement
        assert metrics[Metric.MODEL_SIZE_BYTES] == r.size_bytes
        assert r.latency_ms is None and Metric.LATENCY_MS_B1_P50 not in metrics
        assert set(Param.VARIANT_PARAMS) <= set(run.data.params)
        if r.name != "fp32":  # the returned file is the one the run recorded
            assert file_sha256(r.model_file) == run.data.tags[Tag.MODEL_FILE_SHA256]

    # ... and registered the best int8 model of each framework, as the sweep does.
    versions = {name: client.search_model_versions(f"name = '{name}'") for name in ("resnet8-int8",
                                                                                    "resnet8-int8-onnx")}
    assert [v.run_id for v in versions["resnet8-int8"]] == [results["pytorch-fx-int8-x86"].run_id]
    assert [v.run_id for v in versions["resnet8-int8-onnx"]] == [results["ort-int8"].run_id]
    results.cleanup()
