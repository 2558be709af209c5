"""Layers import only downward: `pipelines/` may use `models/` and `tracking/`, which never import `pipelines/`;
`common/` (errors, interrupts, files, versions) sits below all three and imports none of them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("common", "models", "tracking", "pipelines")
# What each lower layer may not import (as `import X`, `import X.y` or `from X[.y] import ...`).
FORBIDDEN = {"models": {"pipelines"}, "tracking": {"pipelines"}, "common": {"models", "tracking", "pipelines"}}


def _imported_top_levels(path: Path) -> set[str]:
    """Top-level names of every absolute module this file imports, anywhere in it (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_lower_layer_imports_an_upper_one_in_its_source(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    problems = {f.relative_to(ROOT).as_posix(): sorted(_imported_top_levels(f) & FORBIDDEN[package]) for f in files}
    assert {f: p for f, p in problems.items() if p} == {}


def _modules_loaded_by_importing(packages: tuple[str, ...]) -> list[str]:
    """In a fresh interpreter: import every module of `packages` (walked with pkgutil) and list sys.modules."""
    code = """
import importlib, json, pkgutil, sys
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", code, *packages], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_all_of_models_and_tracking_loads_nothing_of_pipelines():
    loaded = _modules_loaded_by_importing(("models", "tracking"))
    assert "models.weight_correction" in loaded and "tracking.runs" in loaded  # the walk really imported them
    assert [m for m in loaded if m == "pipelines" or m.startswith("pipelines.")] == []


def test_importing_common_loads_no_other_layer():
    loaded = _modules_loaded_by_importing(("common",))
    assert "common.files" in loaded
    assert [m for m in loaded if m.split(".")[0] in {"models", "tracking", "pipelines", "mlflow"}] == []


def test_the_variant_runner_imports_neither_mlflow_nor_tracking():
    """The runner quantizes, evaluates and benchmarks without an experiment tracker (pipelines.api, track=False)."""
    loaded = _modules_loaded_by_importing(("pipelines.variant_runner",))
    assert "pipelines.variant_runner" in loaded
    assert [m for m in loaded if m.split(".")[0] in {"mlflow", "tracking"}] == []


def test_every_project_package_is_installed_by_pyproject():
    """Each top-level package is in [tool.setuptools.packages.find] include, so `pip install .` ships it."""
    import fnmatch
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    assert packages == sorted(PROJECT_PACKAGES)
    assert [p for p in packages if not any(fnmatch.fnmatch(p, pattern) for pattern in include)] == []
