"""The FP32 reference's onnxruntime scores over the test set, computed on a second thread while the model is
converted: the conversion is one core of Python and torch, onnxruntime runs without the GIL."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

THREAD_PREFIX = "fp32-onnxruntime"


class ReferencePass:
    """At most one background pass at a time: started, then taken (its scores) or stopped (cancelled between
    batches, waited for)."""

    def __init__(self):
        self.future: Future | None = None
        self._cancelled: threading.Event | None = None

    @property
    def running(self) -> bool:
        """Started and not yet taken or stopped."""
        return self.future is not None

    def start(self, compute: Callable[[threading.Event], np.ndarray]) -> None:
        """Run `compute(cancelled)` on a thread of its own; `cancelled` is set when the pass is stopped."""
        if self.running:
            return
        self._cancelled = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix=THREAD_PREFIX)
        self.future = pool.submit(compute, self._cancelled)
        pool.shutdown(wait=False)

    def take(self) -> np.ndarray | None:
        """The pass's scores (waiting for them), or None when no pass was started. It is no longer running after."""
        future, self.future = self.future, None
        return future.result() if future is not None else None

    def stop(self) -> None:
        """Cancel a running pass: it ends before its next batch; returns once it has."""
        if self.future is not None:
            self._cancelled.set()
            self.future.exception()  # wait: the session stops before the next batch
            self.future = None
