"""The test set made model-ready once for every model a sweep evaluates gives the same scores as making each batch
ready as it is evaluated (what a test set too large to keep ready gets)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx_fixture import tiny_cnn

import pipelines.variant_runner as variant_runner
from models.onnx_model import load_classifier
from pipelines.datasets import Dataset, Split
from pipelines.preprocessing import InputTransform, Preprocessing
from pipelines.variant_runner import RunnerOptions, VariantRunner


@pytest.mark.parametrize("preprocessing", [Preprocessing.raw, Preprocessing.standardize])
def test_ready_once_and_batch_by_batch_give_the_same_scores(tmp_path, monkeypatch, preprocessing):
    onnx.save(tiny_cnn(), str(tmp_path / "tiny.onnx"))
    rng = np.random.default_rng(0)
    test = Split(rng.integers(0, 256, (300, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 300))
    data = Dataset(test, test, tuple(f"c{i}" for i in range(10)), "digest", tmp_path)
    inputs = SimpleNamespace(data=data, model=load_classifier(tmp_path / "tiny.onnx"), test=test,
                             transform=InputTransform("NHWC", preprocessing), calibration=None,
                             calibration_digest="")
    options = RunnerOptions(bench=False, diagnose_images=0)
    once = VariantRunner(inputs, tmp_path / "once", options)
    once.convert([])
    ready = once.run_reference().evaluation.scores
    assert once._ready_test is not None  # 300 images fit: kept ready

    monkeypatch.setattr(variant_runner, "READY_TEST_BYTES", 0)
    batched = VariantRunner(inputs, tmp_path / "batched", options)
    batched.convert([])
    scores = batched.run_reference().evaluation.scores
    assert batched._ready_test is None
    np.testing.assert_array_equal(ready, scores)

