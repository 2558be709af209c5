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


def run_default_sweep(model: Path, data_dir: Path, **options):
    """The default sweep (plus `options`) against a temp sqlite store; your own store is not touched."""
    model, data_dir = model.resolve(), data_dir.resolve()  # before the chdir below
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        cwd = os.getcwd()
        os.chdir(store)
        try:
            from pipelines.progress import quiet_library_warnings
            from pipelines.sweep import SweepOptions, run_sweep

            quiet_library_warnings()
            return run_sweep(SweepOptions(model_path=model, data_dir=data_dir, **options))
        finally:
            os.chdir(cwd)
