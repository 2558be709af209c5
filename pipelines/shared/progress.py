"""Progress of long steps: rich bars on an interactive terminal; plain lines when output goes to a file or a pipe
(no ANSI codes), one when a step ends and one every PTQFLOW_PROGRESS_INTERVAL seconds (default 10) while it runs,
each with the time since the command started and what is done out of the total."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from ptqflow.common.interrupts import checkpoint

console = Console(stderr=True)

# Seconds between plain progress lines while a step runs (output not on a terminal); 0: a line at every advance.
INTERVAL_ENV = "PTQFLOW_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_SECONDS = 10.0
_STARTED = time.monotonic()  # imported by the CLI module, so about when the command started


def bars_enabled() -> bool:
    """Rich bars only on an interactive terminal (rich's TTY_INTERACTIVE=0/1 overrides the detection); anywhere
    else plain lines. Checked per step: the CLI also runs in-process under tests with its streams swapped."""
    override = os.environ.get("TTY_INTERACTIVE")
    if override in ("0", "1"):
        return override == "1"
    return console.is_terminal and not console.is_dumb_terminal


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS)))
    except ValueError:
        return DEFAULT_INTERVAL_SECONDS


def _clock() -> str:
    seconds = int(time.monotonic() - _STARTED)
    return f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}]"


def plain_line(message: str) -> None:
    """One line as it is: no markup, highlighting, colour or wrapping."""
    out = console.file
    out.write(message + "\n")
    out.flush()


class _PlainProgress:
    """The plain-line counterpart of a rich progress task."""

    def __init__(self, description: str, total: int | None, completed: int, unit: str | None):
        self.description, self.total, self.completed, self.unit = description, total, completed, unit
        self.started = self.last_line = time.monotonic()
        self.interval = progress_interval()

    def _amount(self, n: int) -> str:
        return decimal(n) if self.unit == "bytes" else str(n)

    def _done_of_total(self) -> str:
        if self.total is None:
            return self._amount(self.completed)
        percent = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        return f"{self._amount(self.completed)}/{self._amount(self.total)}{percent}"

    def update(self, advance: int, total: int | None) -> None:
        if total is not None:
            self.total = total
        self.completed += advance
        now = time.monotonic()
        unfinished = self.total is None or self.completed < self.total  # a finished step gets its done line next
        if advance and unfinished and now - self.last_line >= self.interval:
            self.last_line = now
            plain_line(f"{_clock()} {self.description}: {self._done_of_total()}, {now - self.started:.0f} s so far")

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        if not self.completed:  # nothing counted: e.g. a cached result
            plain_line(f"{_clock()} {self.description}: done in {seconds:.1f} s")
        elif self.total is not None and self.completed < self.total:  # e.g. a download the server cut short
            plain_line(f"{_clock()} {self.description}: ended at {self._done_of_total()} after {seconds:.1f} s")
        else:
            plain_line(f"{_clock()} {self.description}: {self._done_of_total()} done in {seconds:.1f} s")


@contextmanager
def progress_task(description: str, total: int | None, *, unit: str | None = None, completed: int = 0,
                  show: bool = True):
    """Yields advance(n, total=None); `total` corrects the step count once the work knows it. unit="bytes" counts
    a download. On a terminal the bar is transient: it disappears when the step ends and the step's summary line
    stays; elsewhere plain lines report the step (none when it fails). show=False: no output at all."""
    if not show or bars_enabled():
        columns = ((TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn()) if unit == "bytes" else
                   (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn()))
        with Progress(*columns, console=console, transient=True, disable=not show) as progress:
            task = progress.add_task(description, total=total, completed=completed)

            def advance(n: int = 1, total: int | None = None) -> None:
                checkpoint()  # every step of long work is a safe place to stop
                if total is not None:
                    progress.update(task, total=total)
                progress.advance(task, n)

            yield advance
        return
    plain = _PlainProgress(description, total, completed, unit)

    def advance_plain(n: int = 1, total: int | None = None) -> None:
        checkpoint()
        plain.update(n, total)

    yield advance_plain
    plain.finish()


def say(message: str) -> None:
    # Not on a terminal: one line per message (rich would wrap it at 80 columns); colours are dropped there anyway.
    console.print(message, highlight=False, soft_wrap=not bars_enabled())


def quiet_library_warnings() -> None:
    """torch.ao and torch.jit print deprecation notices on every call; users need ptqflow's own output."""
    import warnings

    import os

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category,
                                module=r"(torch|onnxruntime|onnx2torch|mlflow|optuna)(\.|$)")
    # MLflow draws a tqdm bar for every logged model the sweep downloads back (a second each): noise between
    # ptqflow's own progress lines. A user who wants them sets the variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The same notices attributed to the caller (ptqflow's own torch.jit.trace, MLflow's torch.jit.load), by message:
    # the patterns are ptqflow.models.runtime.runners's JIT_DEPRECATION and QUANTIZED_TENSOR_DEPRECATION (not imported: numpy).
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.[a-z_]+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized")
