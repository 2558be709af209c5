"""The speed check: a convolution whose int8 kernel is slower than its FP32 one here stays in FP32, and every record
of the variant says which and why (issue 24, item 5)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, runs_by_name
from onnx_fixture import fit_dense_head, tiny_cnn


def _named_tiny_cnn():
    from ptqflow.models.graph.rewrites import name_unnamed_nodes

    return name_unnamed_nodes(tiny_cnn())


@pytest.mark.parametrize("weights,per_channel", [("int8", True), ("uint8", False)])
def test_each_convolution_is_timed_in_its_own_kernel(weights, per_channel):
    """Both timings come from the convolution kernel itself: QLinearConv for int8 (a QDQ pattern onnxruntime did not
    fuse would raise), the FP32 Conv otherwise; a stem and a depthwise layer alike."""
    from ptqflow.models.backends.speed_check import conv_shapes
    from ptqflow.models.runtime.layer_speed import ConvShape, time_conv

    stem = next(iter(conv_shapes(_named_tiny_cnn()).values()))
    assert stem.input_shape == (1, 3, 32, 32) and stem.weight_shape == (8, 3, 3, 3)
    depthwise = ConvShape((1, 16, 16, 16), (16, 1, 3, 3), False,
                          (("group", 16), ("kernel_shape", (3, 3)), ("pads", (1, 1, 1, 1))))
    for shape in (stem, depthwise):
        timing = time_conv(shape, weights, per_channel, "uint8")
        assert timing.fp32_us > 0 and timing.int8_us > 0


def test_a_convolution_that_cannot_be_timed_stays_as_the_quantizer_makes_it(tmp_path, monkeypatch):
    """A layer onnxruntime cannot run on its own (here: 3 channels in 2 groups) is not timed and not kept in FP32;
    nothing is cached for it, and the variant is not failed for it."""
    from ptqflow.models.backends.speed_check import cache_file, timing_key, timing_or_none
    from ptqflow.models.runtime.layer_speed import ConvShape

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    broken = ConvShape((1, 3, 8, 8), (8, 3, 3, 3), False, (("group", 2), ("kernel_shape", (3, 3))))
    assert timing_or_none(broken, "int8", True, "uint8") is None
    assert not cache_file(timing_key(broken, "int8", True, "uint8")[0]).exists()


def _seed(shape, weights: str, per_channel: bool, fp32_us: float, int8_us: float) -> None:
    """Write one layer's timings where the speed check keeps them, as a measurement on this machine would."""
    from ptqflow.common.files import write_json_atomic
    from ptqflow.models.backends.speed_check import cache_file, timing_key

    key, payload = timing_key(shape, weights, per_channel, "uint8")
    write_json_atomic(cache_file(key), {**payload, "fp32_us": fp32_us, "int8_us": int8_us})


def test_a_layer_slower_in_int8_stays_fp32_and_every_record_says_why(tmp_path, cifar_dir, tracking_store,
                                                                      monkeypatch):
    """With the stem's int8 kernel 10x its FP32 one and the second convolution's 10x faster, ort-int8 keeps the stem
    in FP32 and only it: the model file, the kept_float tag, the int8 MAC share and the diagnosis all say so, and
    a second decision on the same machine reads the same timings instead of timing again."""
    from ptqflow import quantize
    from ptqflow.models.backends.mac_share import MacTable
    from ptqflow.models.backends.ort import OrtStaticConfig
    from ptqflow.models.backends.speed_check import conv_shapes, slow_int8_layers
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.tracking.keys import Artifact, Param, Tag

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # seeded timings for this test only
    train = load_cifar10(cifar_dir).train
    model = fit_dense_head(_named_tiny_cnn(), train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels)
    path = tmp_path / "speedy.onnx"
    onnx.save(model, str(path))
    (stem, stem_shape), (second, second_shape) = conv_shapes(model).items()
    _seed(stem_shape, "int8", True, fp32_us=5.0, int8_us=50.0)
    _seed(second_shape, "int8", True, fp32_us=50.0, int8_us=5.0)
    config = OrtStaticConfig(activation_dtype="uint8")
    assert [layer.node for layer in slow_int8_layers(model, config)] == [stem]

    result = quantize(path, cifar_dir, ["ort-int8"], calibration_size=CALIBRATION_SIZE, bench=False,
                      adaround_iterations=ADAROUND_ITERATIONS, register=False, diagnose=True, diagnose_images=32)
    report = result["ort-int8"]
    assert report.status == "ok", report.reason
    run = runs_by_name()["ort-int8"]
    assert run.data.tags[Tag.KEPT_FLOAT].startswith(f"{stem}: int8 kernel slower here: 50.0 µs against 5.0 µs")
    assert second not in run.data.tags[Tag.KEPT_FLOAT]
    assert "FP32 where int8 is slower" in run.data.params[Param.QCONFIG]

    quantized = onnx.load(str(report.model_file))
    producers = {out: node for node in quantized.graph.node for out in node.output}
    convs = [node for node in quantized.graph.node if node.op_type == "Conv"]
    weight_sources = [producers[c.input[1]].op_type if c.input[1] in producers else "initializer" for c in convs]
    assert sorted(weight_sources) == ["DequantizeLinear", "initializer"]  # the stem reads FP32 weights

    table = MacTable(model)
    share = float(run.data.params[Param.INT8_MAC_SHARE])
    without = table.share(OrtStaticConfig(activation_dtype="uint8", speed_check=False))
    stem_macs = next(layer.macs for layer in table.layers if layer.name == stem)
    assert share == pytest.approx(without - stem_macs / table.total, abs=2e-4) and share < without

    from mlflow.tracking import MlflowClient

    local = MlflowClient().download_artifacts(run.info.run_id, Artifact.DIAGNOSIS_JSON, str(tmp_path / "diag"))
    rows = {row["layer"]: row for row in json.loads(open(local).read())["layers"]}
    assert "int8 kernel slower here" in rows[stem]["float_reason"]
    assert rows[second]["float_reason"] == ""


def test_no_speed_check_quantizes_the_layer_the_check_would_keep(tmp_path, cifar_dir, tracking_store, monkeypatch):
    """`ptqflow sweep --no-speed-check` with the same seeded timings: the stem whose int8 kernel is 10x slower is
    quantized all the same, and the records say the check was off (qconfig.json's speed_check, no kept_float)."""
    from typer.testing import CliRunner

    from ptqflow.models.backends.speed_check import conv_shapes
    from ptqflow.pipelines.cli.app import app
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.tracking.keys import Artifact, Param, Tag

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = load_cifar10(cifar_dir).train
    model = fit_dense_head(_named_tiny_cnn(), train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels)
    path = tmp_path / "speedy.onnx"
    onnx.save(model, str(path))
    (stem, stem_shape), _ = conv_shapes(model).items()
    _seed(stem_shape, "int8", True, fp32_us=5.0, int8_us=50.0)

    result = CliRunner().invoke(app, ["sweep", "--model", str(path), "--data-dir", str(cifar_dir), "--variant",
                                      "ort-int8", "--calibration-size", str(CALIBRATION_SIZE), "--weight-rounding",
                                      "nearest", "--no-bench", "--no-diagnose", "--no-register", "--no-speed-check"])
    assert result.exit_code == 0, result.output
    run = runs_by_name()["ort-int8"]
    assert Tag.KEPT_FLOAT not in run.data.tags
    assert "FP32 where int8 is slower" not in run.data.params[Param.QCONFIG]
    from mlflow.tracking import MlflowClient

    local = MlflowClient().download_artifacts(run.info.run_id, Artifact.QCONFIG, str(tmp_path / "q"))
    assert json.loads(open(local).read())["config"]["speed_check"] is False
