"""Ctrl-C and SIGTERM set a flag that checkpoints turn into KeyboardInterrupt, in ordinary code only."""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import pytest

from ptqflow.common.interrupts import checkpoint, deferred_interrupts, stop_requested
from ptqflow.models.runtime.latency import BenchConfig, benchmark


def test_first_signal_only_sets_the_flag_and_checkpoint_raises():
    with deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested()  # the handler ran (the main thread checks signals between bytecodes) and did not raise
        with pytest.raises(KeyboardInterrupt):
            checkpoint()


def test_second_signal_raises_at_once():
    with deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # give the interpreter bytecode boundaries to run the handler at
                pass


def test_signal_inside_a_finaliser_is_not_lost():
    """A KeyboardInterrupt raised inside __del__ is printed and dropped by Python; the flag survives it."""

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    with deferred_interrupts():
        SignalsWhenCollected()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            checkpoint()


def test_previous_handlers_and_flag_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not stop_requested()
    checkpoint()  # nothing pending outside the scope


def test_benchmark_stops_at_the_next_iteration():
    calls = []

    def predict(x):
        calls.append(len(x))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return x

    with deferred_interrupts(), pytest.raises(KeyboardInterrupt):
        benchmark(lambda threads: predict, np.zeros((4, 3, 2, 2), np.float32),
                  BenchConfig(warmup_runs=5, latency_runs=50, throughput_runs=5))
    assert len(calls) == 3
