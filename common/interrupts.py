"""Ctrl-C and SIGTERM stop ptqflow at the next safe point.

Raising KeyboardInterrupt straight from a signal handler is not reliable: when the signal lands inside a weakref
callback or `__del__` (SQLAlchemy and torch run many), Python prints "Exception ignored" and the work goes on; when
it lands inside `exec` (dataclasses and lazy imports use it), the interpreter later dies of SIGINT whatever exit
code was chosen. So the first signal only sets a flag, and `checkpoint()` raises KeyboardInterrupt from ordinary
code: every progress step, every AdaRound and benchmark iteration, the start of every run. A second signal raises
at once, for a user who will not wait."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None  # the signal number received, if any


def _handler(signum, frame):
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt
    _requested = signum
    # os.write, not print: the handler may run while the console holds its lock for a progress refresh.
    os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next safe point "
                f"(send it again to stop at once)\n".encode())


def stop_requested() -> bool:
    return _requested is not None


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a stop was requested: call it where stopping leaves nothing half done."""
    if _requested is not None:
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts():
    """Route Ctrl-C and SIGTERM through the flag for the duration; restore the previous handlers afterwards (the
    CLI also runs in-process under tests)."""
    global _requested
    try:
        previous = {sig: signal.signal(sig, _handler) for sig in _STOP_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here, keep Python's behaviour
        yield
        return
    _requested = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _requested = None
