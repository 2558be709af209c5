"""Nothing in the sweep is specific to one model file: other CIFAR-10 classifier layouts run through it unchanged."""

from __future__ import annotations

import onnx
import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, SHARED
from onnx_fixture import pytorch_style_cnn, tiny_cnn
from mlflow.tracking import MlflowClient

from ptqflow.pipelines.sweep.options import SweepOptions

from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.tracking.keys import Metric

VARIANTS = ("pytorch-fx-int8-x86", "ort-int8", "ort-uint8")


def _onnxruntime_accuracy(model_path, cifar_dir, layout: str) -> float:
    """The model's accuracy on the fixture test set, computed directly (raw 0..255 pixels in `layout`)."""
    import onnxruntime as ort

    from ptqflow.pipelines.data.cifar import load_cifar10

    test = load_cifar10(cifar_dir).test
    images = test.images.astype("float32")
    if layout == "NHWC":
        images = images.transpose(0, 2, 3, 1)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    scores = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((scores.argmax(axis=1) == test.labels).mean())


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
    # These untrained models predict two classes (accuracy 0.0-0.1); FP32's accuracy must still be the model's own,
    # computed here with onnxruntime in the model's layout.
    assert fp32.evaluation.accuracy == pytest.approx(_onnxruntime_accuracy(path, cifar_dir, layout))
    for outcome in result.outcomes:
        logged = MlflowClient().get_run(outcome.run_id).data.metrics
        assert logged[Metric.ACCURACY] == pytest.approx(outcome.evaluation.accuracy)
        assert logged[Metric.TOP1_AGREEMENT] == pytest.approx(outcome.fidelity.top1_agreement)
    for outcome in result.outcomes[1:]:
        # Measured 1.00 for both tiny_cnn layouts and 0.99 for the pytorch-style model, every variant. The floor
        # leaves 5 of the 100 test images of margin; a wrong layout or a broken quantizer ends far below it.
        assert outcome.fidelity.top1_agreement >= 0.95, outcome.name


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "models" / "resnet8_large_wide.onnx").exists(), reason="../shared not present")
def test_wide_resnet_from_tflite_runs_through_the_sweep(tracking_store, cifar_dir):
    result = run_sweep(SweepOptions(model_path=SHARED / "models" / "resnet8_large_wide.onnx", data_dir=cifar_dir,
                                    calibration_size=CALIBRATION_SIZE, variants=VARIANTS, bench=False,
                                    register=False, weight_rounding="nearest"))
    assert all(o.status == "ok" for o in result.outcomes)
