"""A model with an op onnx2torch has no converter for (ThresholdedRelu here) still gets its ONNX Runtime variants:
the PyTorch ones are unsupported with onnx2torch's reason and AdaRound, which fits on onnx2torch's module, gives way
to nearest rounding, said on each run. Before, the whole sweep stopped at the FP32 conversion."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from conftest import CALIBRATION_SIZE, runs_by_name
from onnx_fixture import fit_dense_head, tiny_cnn

ORT_VARIANTS = ("ort-int8", "ort-uint8", "ort-int8-u8s8")
FX_VARIANTS = ("pytorch-fx-int8", "pytorch-fx-int8-x86", "pytorch-fx-int8-onednn")


def _unconvertible(path, cifar_dir):
    from ptqflow.pipelines.data.cifar import load_cifar10

    model = tiny_cnn()
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.op_type = "ThresholdedRelu"  # alpha 0: the same function, an op onnx2torch cannot convert
    relu.attribute.extend([helper.make_attribute("alpha", 0.0)])
    train = load_cifar10(cifar_dir).train
    onnx.save(fit_dense_head(model, train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels), str(path))
    return path


def test_a_model_onnx2torch_cannot_convert_gets_its_onnx_runtime_variants(tmp_path, cifar_dir, tracking_store):
    from ptqflow import quantize
    from ptqflow.tracking.keys import Param, Tag

    path = _unconvertible(tmp_path / "thresholded.onnx", cifar_dir)
    results = quantize(path, cifar_dir, [*FX_VARIANTS, *ORT_VARIANTS], calibration_size=CALIBRATION_SIZE, bench=False,
                       adaround_iterations=20, register=False, diagnose=False)
    assert results["fp32"].accuracy > 0.5
    for name in FX_VARIANTS:
        assert results[name].status == "unsupported", (name, results[name].status)
        assert "ThresholdedRelu" in results[name].reason
    runs = runs_by_name()
    assert "ThresholdedRelu" in runs["fp32"].data.tags[Tag.WARNING]
    for name in ORT_VARIANTS:
        assert results[name].status == "ok", (name, results[name].reason)
        assert results[name].agreement >= 0.9, (name, results[name].agreement)
        run = runs[name]
        assert run.data.params[Param.WEIGHT_ROUNDING] == "adaround"  # what was asked
        assert run.data.params[Param.WEIGHT_ROUNDING_KEPT] == "nearest"  # what the file holds, and why
        assert run.data.tags[Tag.ROUNDING_CHOICE].startswith("nearest rounding: AdaRound fits each layer on "
                                                             "onnx2torch's module, and onnx2torch cannot convert")
