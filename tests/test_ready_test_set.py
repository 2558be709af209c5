"""The test set made model-ready once for every model a sweep evaluates gives the same scores as making each batch
ready as it is evaluated (what a test set too large to keep ready gets)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_runner

import ptqflow.pipelines.variants.ready_test as ready_test
from ptqflow.pipelines.data.preprocessing import Preprocessing


@pytest.mark.parametrize("preprocessing", [Preprocessing.raw, Preprocessing.standardize])
def test_ready_once_and_batch_by_batch_give_the_same_scores(tmp_path, monkeypatch, preprocessing):
    once = tiny_runner(tmp_path, "once", preprocessing=preprocessing)
    once.convert([])
    ready = once.run_reference().evaluation.scores
    assert once.test_images.kept_ready  # 300 images fit: kept ready

    monkeypatch.setattr(ready_test, "READY_TEST_BYTES", 0)
    batched = tiny_runner(tmp_path, "batched", preprocessing=preprocessing)
    batched.convert([])
    scores = batched.run_reference().evaluation.scores
    assert not batched.test_images.kept_ready
    np.testing.assert_array_equal(ready, scores)
