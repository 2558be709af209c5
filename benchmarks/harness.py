"""Shared by the benchmark scripts: run a default sweep in a throw-away MLflow store."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_default_sweep(model: Path, data_dir: Path, before=None, **options):
    """The default sweep (plus `options`) against a temp sqlite store; your own store is not touched. `before`:
    called with the sweep function first, in the same store (e.g. an untimed sweep, so the timed one finds the store
    and the caches as a user's second sweep does)."""
    model, data_dir = model.resolve(), data_dir.resolve()  # before the chdir below
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        cwd = os.getcwd()
        os.chdir(store)
        try:
            from ptqflow.pipelines.shared.progress import quiet_library_warnings
            from ptqflow.pipelines.sweep.options import SweepOptions
            from ptqflow.pipelines.sweep.sweep import run_sweep

            quiet_library_warnings()
            sweep = lambda: run_sweep(SweepOptions(model_path=model, data_dir=data_dir, **options))  # noqa: E731
            if before is not None:
                before(sweep)
            return sweep()
        finally:
            os.chdir(cwd)
