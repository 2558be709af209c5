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
        assert entry["command"].startswith("python -m ptqflow ")
        for name in entry["parameters"]:
            assert "{" + name + "}" in entry["command"]


def test_no_tracked_file_holds_merge_conflict_markers():
    """A merge resolved by hand once left `<<<<<<<` blocks in the README; the markers must never land again."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    markers = ("<" * 7 + " ", ">" * 7 + " ")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(markers):
                offenders.append(f"{name}:{number}")
    assert not offenders, f"conflict markers in {offenders}"
