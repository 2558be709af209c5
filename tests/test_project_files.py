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


# MLproject parameters whose default is the entry point's own choice where the command line has none to compare.
ENTRY_POINT_CHOICES = {
    ("pull", "name"): "a required argument on the command line",
    ("pull", "version"): "the command line requires --version or --alias",
}
# How MLproject, which always passes a value, spells a command-line option left unset.
UNSET_SPELLED_AS = {"--test-limit": 0}  # 0: all test images, as with no --test-limit


def _entry_point_command(command_line: str):
    """The click command an MLproject command runs, and the words after the command's name."""
    import typer

    from ptqflow.pipelines.cli.app import app

    words = command_line.split()
    assert words[:3] == ["python", "-m", "ptqflow"], command_line
    command, words = typer.main.get_command(app), words[3:]
    while words and words[0] in getattr(command, "commands", {}):
        command, words = command.commands[words[0]], words[1:]
    return command, words


def test_mlproject_defaults_are_the_command_lines():
    """Every MLproject parameter passed to an option defaults to that option's default, so `mlflow run` and
    `ptqflow` run the same sweep (quantize_ort once defaulted --calibration-method to MinMax, unlike the CLI)."""
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    compared, problems = 0, []
    for entry, spec in mlproject["entry_points"].items():
        command, words = _entry_point_command(spec["command"])
        by_option = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        problems += [f"{entry}: `{spec['command']}` passes {word}, which the command lacks"
                     for word in words if word.startswith("--") and word not in by_option]
        for before, word in zip(["", *words], words):
            name = word.strip("{}")
            if word != "{" + name + "}" or (entry, name) in ENTRY_POINT_CHOICES:
                continue
            assert before in by_option, f"{entry}: {{{name}}} is passed to no option of the command"
            cli_default = by_option[before].default
            expected = UNSET_SPELLED_AS.get(before) if cli_default is None else cli_default
            default = spec["parameters"][name].get("default")
            compared += 1
            if str(default) != str(getattr(expected, "value", expected)):
                problems.append(f"{entry}: {name} defaults to {default!r}, {before} to {expected!r}")
    assert compared >= 15  # every entry point's parameters were found
    assert not problems, "\n".join(problems)


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
