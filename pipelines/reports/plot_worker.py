"""Plots drawn in a background process while the sweep goes on.

matplotlib took about 7 s of a ResNet8 sweep's main thread (a confusion matrix and a per-layer SQNR plot per
variant, 0.3-1 s each inside a large process), time in which the next variant could already be quantized. Every
plot here is a function of plain data returning PNG bytes (ptqflow.pipelines.reports.plots, ptqflow.pipelines.reports.diagnosis), so one
spawned process can draw them: it runs at a lower priority (nice) and takes the CPU the sweep leaves idle (MLflow
calls, Python between the kernels). A process, not a thread: matplotlib is Python code that holds the GIL.

`submit` returns a PendingPlot whose `result()` gives the PNG. When the process cannot start or dies, plots are
drawn in this process instead, so a sweep never loses one to the worker.

The process outlives the sweep that started it: every later sweep of the same Python process (a tuner's trials, a
script's calls of ptqflow.quantize, a test session) draws in it too. Starting it and importing matplotlib there took
0.6 s per sweep on two cores, on the critical path of a small model's sweep, which waits for its last plots.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

NICENESS = 10  # the drawing yields the CPU to the sweep's own work
PARENT_CHECK_SECONDS = 0.5


def _start_worker(sweep_pid: int) -> None:
    """In the worker: a lower priority; Ctrl-C left to the sweep (the terminal sends it to the whole process group;
    the sweep ends its runs and stops the worker, which would otherwise print a traceback of its own); and an end
    when the sweep's process is gone without stopping it (killed): the worker holds both ends of its task queue,
    so it would wait for a task forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(NICENESS)
    except OSError:  # not permitted here: draw at the same priority
        pass
    threading.Thread(target=_exit_without, args=(sweep_pid,), daemon=True, name="exit-with-the-sweep").start()


def _exit_without(sweep_pid: int) -> None:
    while os.getppid() == sweep_pid:  # re-parented once the sweep's process has died
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _draw(module: str, name: str, args: tuple, kwargs: dict) -> bytes:
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _importable(function: Callable) -> bool:
    """Whether the worker can find `function` by its module and name (a nested function, a lambda or a function of
    the script that runs the sweep it cannot: those are drawn here)."""
    name = getattr(function, "__module__", None) or ""
    module = sys.modules.get(name)
    return name != "__main__" and module is not None and getattr(
        module, getattr(function, "__name__", ""), None) is function


@contextlib.contextmanager
def _main_script_hidden():
    """The main module's name and file hidden from multiprocessing while it starts the worker. A spawned process
    runs the parent's main script again (as __mp_main__) before it takes work, so a user's script that calls
    ptqflow.quantize() without an `if __name__ == "__main__":` guard swept a second time inside the plot worker.
    The worker draws with ptqflow's own functions and needs nothing from that script."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if main is not None and key in main.__dict__}
    try:
        if main is not None:
            main.__spec__ = None
            main.__dict__.pop("__file__", None)
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class PendingPlot:
    """A plot being drawn: `result()` waits for its PNG (and raises what drawing it raised)."""

    def __init__(self, function: Callable[..., bytes], args: tuple, kwargs: dict, future: Future | None,
                 pool: ProcessPoolExecutor | None = None):
        self._function, self._args, self._kwargs, self._future, self._pool = function, args, kwargs, future, pool

    def result(self) -> bytes:
        if self._future is not None:
            try:
                return self._future.result()
            except BrokenProcessPool:  # the worker died (killed, out of memory): draw it here
                _discard_shared_pool(self._pool)
        return self._function(*self._args, **self._kwargs)


_shared_pool: dict[int, ProcessPoolExecutor] = {}  # by the pid that started it: a forked child starts its own
_shared_pool_lock = threading.Lock()


def _drawing_pool() -> ProcessPoolExecutor:
    """The process pool every PlotWorker of this Python process submits to (created on first use; its process
    starts with the first submit)."""
    with _shared_pool_lock:
        pid = os.getpid()
        if pid not in _shared_pool:
            _shared_pool[pid] = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_worker, initargs=(pid,))
        return _shared_pool[pid]


def _discard_shared_pool(pool: ProcessPoolExecutor | None) -> None:
    """Forget a pool whose process died, so the next sweep starts a new one."""
    with _shared_pool_lock:
        if pool is not None and _shared_pool.get(os.getpid()) is pool:
            del _shared_pool[os.getpid()]
            pool.shutdown(wait=False, cancel_futures=True)


class PlotWorker:
    """One sweep's plots drawn in the background process; a context manager that cancels, on leaving, the plots
    submitted and not yet started (the process stays for the next sweep). `background=False` draws every plot in
    this process when asked for."""

    def __init__(self, background: bool = True):
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[Future] = []
        if background:
            try:
                self._pool = _drawing_pool()
            except (OSError, ValueError):  # no process to be had here: draw in this one
                self._pool = None

    @property
    def background(self) -> bool:
        """Whether plots are drawn in the background process (else each when its result is asked for)."""
        return self._pool is not None

    def submit(self, function: Callable[..., bytes], *args, **kwargs) -> PendingPlot:
        """Start drawing `function(*args, **kwargs)`: in the worker when `function` is a module-level function
        (its arguments picklable data), else here when its result is asked for."""
        future = None
        if self._pool is not None and _importable(function):
            try:
                with _main_script_hidden():  # the first submit starts the process
                    future = self._pool.submit(_draw, function.__module__, function.__name__, args, kwargs)
                self._futures.append(future)
            except (BrokenProcessPool, RuntimeError):  # died earlier, or shut down: draw here from now on
                _discard_shared_pool(self._pool)
                self._pool = None
        return PendingPlot(function, args, kwargs, future, self._pool)

    def close(self) -> None:
        for future in self._futures:
            future.cancel()  # only those not started: a plot being drawn finishes, unread
        self._futures, self._pool = [], None

    def __enter__(self) -> "PlotWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
