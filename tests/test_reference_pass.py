"""The FP32 reference's onnxruntime pass runs on a second thread while the model is converted
(VariantRunner.convert(reference_meanwhile=True)): the same scores as run after it, and nothing left running when
the sweep fails before it takes them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, tiny_runner

from ptqflow.pipelines.variants.evaluation import Cancelled
from ptqflow.pipelines.variants.runner import VariantRunner


def test_the_reference_evaluated_during_the_conversion_gives_the_same_scores(tmp_path):
    after = tiny_runner(tmp_path, "after")
    after.convert([])
    meanwhile = tiny_runner(tmp_path, "meanwhile")
    meanwhile.convert([], reference_meanwhile=True)
    assert meanwhile.reference_pass.running  # started, taken by run_reference below
    np.testing.assert_array_equal(after.run_reference().evaluation.scores,
                                  meanwhile.run_reference().evaluation.scores)
    assert not meanwhile.reference_pass.running


def test_a_failed_conversion_stops_the_reference_evaluation_it_started(tmp_path, monkeypatch):
    runner = tiny_runner(tmp_path, "failing", images=20_000)  # 79 batches: still running when the conversion fails
    monkeypatch.setattr(runner.float_model, "prepare", lambda **_: (_ for _ in ()).throw(ValueError("no torch")))
    stopped = []
    cancel = runner.stop_reference

    def cancel_and_see():
        future = runner.reference_pass.future
        cancel()
        stopped.append(future.exception())

    monkeypatch.setattr(runner, "stop_reference", cancel_and_see)
    with pytest.raises(ValueError, match="no torch"):
        runner.convert([], reference_meanwhile=True)
    [reason] = stopped
    assert isinstance(reason, Cancelled)  # it stopped between batches rather than finish the test set
    assert not runner.reference_pass.running
    assert not _reference_pass_alive()



def _reference_pass_alive() -> bool:
    return any(t.name.startswith("fp32-onnxruntime") and t.is_alive() for t in threading.enumerate())


def test_a_sweep_failing_before_its_fp32_run_stops_the_reference_pass(tracking_store, cifar_dir, tiny_model,
                                                                      monkeypatch):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Param

    log_params, stopped = records.log_params, []
    stop = VariantRunner.stop_reference

    def tracking_gone(params):
        if Param.BATCHNORMS_FOLDED in params:  # logged just after the conversion
            raise RuntimeError("the tracking server went away")
        return log_params(params)

    def stop_and_see(runner):
        stopped.append(runner.reference_pass.running)  # the pass was still the runner's to stop
        stop(runner)

    monkeypatch.setattr(records, "log_params", tracking_gone)
    monkeypatch.setattr(VariantRunner, "stop_reference", stop_and_see)
    with pytest.raises(RuntimeError, match="went away"):
        run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, variants=("ort-int8",),
                               calibration_size=CALIBRATION_SIZE, adaround_iterations=ADAROUND_ITERATIONS,
                               bench=False, register=False))
    assert stopped == [True]
    assert not _reference_pass_alive()
