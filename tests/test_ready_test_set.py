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
from pipelines.evaluation import Cancelled
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


def _runner(tmp_path, name: str, images: int = 300) -> VariantRunner:
    if not (tmp_path / "tiny.onnx").exists():
        onnx.save(tiny_cnn(), str(tmp_path / "tiny.onnx"))
    rng = np.random.default_rng(0)
    test = Split(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, images))
    data = Dataset(test, test, tuple(f"c{i}" for i in range(10)), "digest", tmp_path)
    inputs = SimpleNamespace(data=data, model=load_classifier(tmp_path / "tiny.onnx"), test=test,
                             transform=InputTransform("NHWC", Preprocessing.raw), calibration=None,
                             calibration_digest="")
    return VariantRunner(inputs, tmp_path / name, RunnerOptions(bench=False, diagnose_images=0))


def test_the_reference_evaluated_during_the_conversion_gives_the_same_scores(tmp_path):
    after = _runner(tmp_path, "after")
    after.convert([])
    meanwhile = _runner(tmp_path, "meanwhile")
    meanwhile.convert([], reference_meanwhile=True)
    assert meanwhile._reference_scores is not None  # started, taken by run_reference below
    np.testing.assert_array_equal(after.run_reference().evaluation.scores,
                                  meanwhile.run_reference().evaluation.scores)
    assert meanwhile._reference_scores is None


def test_a_failed_conversion_stops_the_reference_evaluation_it_started(tmp_path, monkeypatch):
    import threading

    runner = _runner(tmp_path, "failing", images=20_000)  # 79 batches: still running when the conversion fails
    monkeypatch.setattr(runner.float_model, "prepare", lambda **_: (_ for _ in ()).throw(ValueError("no torch")))
    stopped = []
    cancel = runner._cancel_reference_scores

    def cancel_and_see():
        future = runner._reference_scores[0]
        cancel()
        stopped.append(future.exception())

    monkeypatch.setattr(runner, "_cancel_reference_scores", cancel_and_see)
    with pytest.raises(ValueError, match="no torch"):
        runner.convert([], reference_meanwhile=True)
    [reason] = stopped
    assert isinstance(reason, Cancelled)  # it stopped between batches rather than finish the test set
    assert runner._reference_scores is None
    assert not any(t.name.startswith("fp32-onnxruntime") and t.is_alive() for t in threading.enumerate())
