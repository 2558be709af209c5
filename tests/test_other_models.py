"""Nothing in the sweep is specific to one model file: other CIFAR-10 classifier layouts run through it unchanged."""

from __future__ import annotations

import onnx
import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, SHARED
from onnx_fixture import pytorch_style_cnn, tiny_cnn

from pipelines.sweep import SweepOptions, run_sweep

VARIANTS = ("pytorch-fx-int8-x86", "ort-int8", "ort-uint8")


@pytest.mark.parametrize("builder,layout", [
    (lambda: tiny_cnn(layout="NCHW"), "NCHW"),
    (lambda: tiny_cnn(layout="NHWC", batch=None), "NHWC"),
    (pytorch_style_cnn, "NCHW"),
], ids=["nchw-tf2onnx-style", "nhwc-tf2onnx-style", "nchw-pytorch-export-style"])
def test_sweep_runs_every_variant_on_other_model_layouts(tracking_store, cifar_dir, builder, layout):
    path = tracking_store / "model.onnx"
    onnx.save(builder(), str(path))
    result = run_sweep(SweepOptions(model_path=path, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=VARIANTS, bench=False, register=False,
                                    adaround_iterations=ADAROUND_ITERATIONS))
    assert {o.name: o.status for o in result.outcomes} == {"fp32": "ok", **{v: "ok" for v in VARIANTS}}
    fp32 = result.outcomes[0]
    assert fp32.evaluation is not None
    for outcome in result.outcomes[1:]:
        assert 0.0 <= outcome.fidelity.top1_agreement <= 1.0


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "models" / "resnet8_large_wide.onnx").exists(), reason="../shared not present")
def test_wide_resnet_from_tflite_runs_through_the_sweep(tracking_store, cifar_dir):
    result = run_sweep(SweepOptions(model_path=SHARED / "models" / "resnet8_large_wide.onnx", data_dir=cifar_dir,
                                    calibration_size=CALIBRATION_SIZE, variants=VARIANTS, bench=False,
                                    register=False, weight_rounding="nearest"))
    assert all(o.status == "ok" for o in result.outcomes)
