"""Rich progress bars for long steps; silent when output is not a terminal so logs stay readable."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from pipelines.interrupts import checkpoint

console = Console(stderr=True)


@contextmanager
def progress_task(description: str, total: int):
    """Yields advance(n, total=None); `total` corrects the step count once the work knows it. Transient: the bar
    disappears when the step ends, the step's summary line stays."""
    enabled = console.is_terminal
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not enabled) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            checkpoint()  # every step of long work is a safe place to stop
            if total is not None:
                progress.update(task, total=total)
            progress.advance(task, n)

        yield advance


def say(message: str) -> None:
    console.print(message, highlight=False)


def is_interactive() -> bool:
    return sys.stderr.isatty()


def quiet_library_warnings() -> None:
    """torch.ao and torch.jit print deprecation notices on every call; users need ptqflow's own output."""
    import warnings

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|onnxruntime|onnx2torch|mlflow)(\.|$)")
