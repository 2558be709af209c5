"""The project's own files agree with each other: conda.yaml pins what pyproject pins, MLproject entry points exist."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_conda_yaml_pins_the_same_versions_as_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pyproject["project"]["dependencies"])


def test_mlproject_has_the_documented_entry_points_and_runs_the_cli():
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(mlproject["entry_points"]) == {"main", "baseline", "quantize_pytorch", "quantize_ort", "pull"}
    for entry in mlproject["entry_points"].values():
        assert entry["command"].startswith("python -m pipelines.cli ")
        for name in entry["parameters"]:
            assert "{" + name + "}" in entry["command"]
