"""How a command ends on a problem: one line on stderr and an exit code for ptqflow's errors, no traceback for
problems a user can fix, and open runs ended rather than left RUNNING."""

from __future__ import annotations

import os
from functools import wraps

import typer

from ptqflow.common.errors import PtqflowError, first_line
from ptqflow.common.interrupts import deferred_interrupts, stop_requested
from ptqflow.pipelines.shared.progress import quiet_library_warnings

EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """One line on stderr and an exit code for ptqflow's errors; no tracebacks for problems a user can fix."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_library_warnings()
        try:
            with deferred_interrupts():  # SIGTERM like Ctrl-C: open runs end KILLED instead of staying RUNNING
                result = fn(*args, **kwargs)
                if stop_requested():
                    typer.echo("note: the stop came after the last safe point; the command had finished", err=True)
                return result
        except PtqflowError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; open runs were ended as KILLED", EXIT_INTERRUPTED)
        except Exception as exc:
            if os.environ.get("PTQFLOW_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {first_line(str(exc), 500)} (open runs were ended as FAILED; "
                  "set PTQFLOW_DEBUG=1 for the traceback)", 1)

    return wrapper
