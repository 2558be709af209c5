"""ONNX model checks, runners and the fidelity metrics."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_fixture import write_tiny_cnn

from ptqflow.common.errors import ModelError
from ptqflow.models.graph.onnx_model import NCHW, NHWC, load_classifier, to_torch
from ptqflow.models.runtime.runners import OrtRunner, TorchRunner
from ptqflow.pipelines.variants.evaluation import evaluate, fidelity


@pytest.mark.parametrize("layout,batch", [(NHWC, None), (NCHW, None), (NHWC, 4), (NCHW, 1)])
def test_input_layout_and_batch_are_read_from_the_model(tmp_path, layout, batch):
    model = load_classifier(write_tiny_cnn(tmp_path / "m.onnx", layout=layout, batch=batch))
    assert model.input.layout == layout and model.input.batch_size == batch
    assert model.input.name == "input_1:0" and len(model.sha256) == 64


def test_any_image_size_is_read_but_other_channel_counts_and_ranks_are_model_errors(tmp_path):
    spec = load_classifier(write_tiny_cnn(tmp_path / "m.onnx", input_shape=["N", 64, 48, 3])).input
    assert (spec.layout, spec.height, spec.width, spec.channels) == (NHWC, 64, 48, 3)
    for shape, fragment in ((["N", 64, 64, 2], "1 or 3 channels"), (["N", 64, 64], "rank 3")):
        with pytest.raises(ModelError, match=fragment):
            load_classifier(write_tiny_cnn(tmp_path / "m.onnx", input_shape=shape))


def test_truncated_onnx_is_a_model_error(tmp_path):
    path = write_tiny_cnn(tmp_path / "m.onnx")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError):
        load_classifier(path)


@pytest.mark.parametrize("layout", [NHWC, NCHW])
def test_onnx2torch_module_matches_onnxruntime(tmp_path, layout):
    path = write_tiny_cnn(tmp_path / "m.onnx", layout=layout)
    model = load_classifier(path)
    shape = (5, 32, 32, 3) if layout == NHWC else (5, 3, 32, 32)
    x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    np.testing.assert_allclose(TorchRunner(to_torch(model)).predict(x), OrtRunner(path).predict(x), atol=1e-5)


def test_fidelity_metrics_on_constructed_scores():
    labels = np.array([0, 1, 2, 3])
    names = tuple(f"c{i}" for i in range(10))
    reference = np.full((4, 10), 0.01, dtype=np.float32)
    reference[np.arange(4), labels] = 0.91
    flipped = reference.copy()
    flipped[3] = reference[2]  # one prediction differs
    ref_eval, var_eval = evaluate(reference, labels, names), evaluate(flipped, labels, names)
    assert ref_eval.accuracy == 1.0 and var_eval.accuracy == 0.75
    assert var_eval.per_class_accuracy["c3"] == 0.0 and var_eval.per_class_accuracy["c0"] == 1.0
    same = fidelity(ref_eval, ref_eval)
    assert same.top1_agreement == 1.0 and same.kl_divergence == pytest.approx(0.0, abs=1e-9)
    assert same.sqnr_db == float("inf")
    diff = fidelity(ref_eval, var_eval)
    assert diff.top1_agreement == 0.75 and diff.kl_divergence > 0 and np.isfinite(diff.sqnr_db)
