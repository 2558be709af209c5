"""What ptqflow prints on a terminal and in a log (issue 14, "On the terminal"):

- progress: plain lines, no ANSI codes, when output is not a terminal (a line per step, interval lines while AdaRound
  runs; PTQFLOW_PROGRESS_INTERVAL=0 makes every advance an interval line, so the test needs no long run);
- every hint in an error message names an option that exists on the command(s) that can raise it;
- loading a quantized TorchScript file (`bench`, `pull`, `serve`) prints no deprecation notice of torch's;
- every command's `--help` stays readable at 80 columns: no word cut in two, no option name cut short.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from enum import Enum
from pathlib import Path

import pytest
import typer
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE
from typer.testing import CliRunner

from ptqflow.pipelines.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _commands(command=None, path: tuple[str, ...] = ()):
    """(path, click command) for the root and every command and subcommand, via Typer's click introspection."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = {" ".join(path): command for path, command in _commands() if path}


def _options_of(command) -> set[str]:
    names = {opt for param in command.params
             for opt in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))}
    return {name for name in names if name.startswith("--")} | {"--help"}


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PTQFLOW_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE",
                                                             "TTY_INTERACTIVE")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def _run_cli(*args, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`ptqflow ARGS` in a subprocess, stdout and stderr to pipes (so not a terminal)."""
    return subprocess.run([sys.executable, "-m", "ptqflow", *map(str, args)], cwd=cwd, env=_cli_env(**env),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


# ---- progress when output is not a terminal ----------------------------------------------------------------------
PLAIN_LINE = re.compile(r"\[\d+:\d\d:\d\d\] (?P<step>.+?): (?:(?P<done>\d+)/(?P<total>\d+) \(\d+%\)"
                        r"(?P<how>, \d+ s so far| done in [\d.]+ s)|done in [\d.]+ s)")


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path, tiny_model, cifar_dir):
    # Its own AdaRound cache: a result cached by another test would skip the optimization and its interval lines.
    # AdaRound advances every 50 steps and at a layer's end: 3x the suite's steps make 2 advances per layer.
    result = _run_cli("sweep", "--model", tiny_model, "--data-dir", cifar_dir, "--calibration-size", CALIBRATION_SIZE,
                      "--adaround-iterations", 3 * ADAROUND_ITERATIONS, "--variant", "pytorch-fx-int8", "--no-register",
                      cwd=tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      XDG_CACHE_HOME=str(tmp_path / "cache"), PTQFLOW_PROGRESS_INTERVAL="0")
    assert result.returncode == 0, result.stderr
    assert not ANSI.search(result.stdout + result.stderr), result.stderr
    lines = [PLAIN_LINE.fullmatch(line) for line in result.stderr.splitlines()]
    progress = [m for m in lines if m]
    done = {m["step"] for m in progress if "done in" in m.group(0)}
    # A line at the end of every step of every phase: FP32 reference, AdaRound, calibration, evaluation, and the
    # benchmark (FP32 and the variant, timed together at the end).
    for step in ("FP32 onnxruntime", "calibrating pytorch-fx-int8", "evaluating pytorch-fx-int8",
                 "benchmarking 2 models in 3 rounds"):
        assert step in done, result.stderr
    assert any(step.startswith("AdaRound") for step in done), result.stderr
    # While AdaRound runs: interval lines (at every advance here), counting optimization steps up to the total.
    adaround = [m for m in progress if m["step"].startswith("AdaRound") and m["how"] and "so far" in m["how"]]
    assert len(adaround) >= 2, result.stderr
    counts = [int(m["done"]) for m in adaround]
    assert counts == sorted(counts) and len(set(counts)) == len(counts) and counts[-1] < int(adaround[-1]["total"])
    # Progress goes to stderr, next to the step summaries; stdout keeps only the table.
    assert "✓ pytorch-fx-int8" in result.stderr and not PLAIN_LINE.search(result.stdout)


def test_progress_lines_honour_the_interval(monkeypatch, capsys):
    from ptqflow.pipelines.shared import progress

    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    with progress.progress_task("counting", total=4) as advance:
        for _ in range(4):
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and PLAIN_LINE.fullmatch(lines[0]) and lines[0].endswith(" s"), lines
    assert "counting: 4/4 (100%) done in" in lines[0]


def test_downloads_report_plain_progress_lines(tmp_path, monkeypatch, capsys):
    from http_fixture import LocalHttpServer

    from ptqflow.pipelines.data.fetch import download
    from ptqflow.pipelines.shared.progress import INTERVAL_ENV

    monkeypatch.setenv(INTERVAL_ENV, "0")
    blob = bytes(range(256)) * 1000  # 256,000 bytes: four 64 KiB reads
    with LocalHttpServer() as server:
        server.files["/blob.bin"] = blob
        download(server.url("/blob.bin"), tmp_path / "blob.bin")
    lines = capsys.readouterr().err.splitlines()
    assert not ANSI.search("\n".join(lines))
    interval = r"\[\d+:\d\d:\d\d\] blob\.bin: [\d.]+ kB/256\.0 kB \(\d+%\), \d+ s so far"
    assert len(lines) >= 2 and all(re.fullmatch(interval, line) for line in lines[:-1]), lines
    assert re.fullmatch(r"\[\d+:\d\d:\d\d\] blob\.bin: 256\.0 kB/256\.0 kB \(100%\) done in [\d.]+ s", lines[-1]), lines


# ---- every hint names an option that exists ---------------------------------------------------------------------
SWEEPS = ("sweep", "baseline", "quantize pytorch", "quantize ort")
QUANTIZERS = ("sweep", "quantize pytorch", "quantize ort")
# Where the messages of each module (or of one of its top-level names) reach the user: the commands that can raise
# them. A module that starts naming options must be added here, with the commands its messages can come from.
RAISED_BY = {
    "models/graph/onnx_model.py": (*SWEEPS, "diagnose"),
    "pipelines/data/calibration.py": QUANTIZERS,
    "pipelines/data/cifar.py": (*SWEEPS, "pull", "bench", "diagnose"),
    "pipelines/data/datasets.py": (*SWEEPS, "pull", "bench", "diagnose"),
    "pipelines/data/npz.py": (*SWEEPS, "pull", "bench", "diagnose"),
    "pipelines/repair/diagnose.py": ("diagnose",),
    "pipelines/data/shapes.py": SWEEPS,
    "pipelines/data/fetch.py:CIFAR10_FETCH_HINTS": ("fetch cifar10",),
    "pipelines/data/fetch.py:RESNET8_FETCH_HINTS": ("fetch resnet8",),
    "pipelines/repair/fallback.py": QUANTIZERS,  # the search's options are the sweep's and quantize's
    "pipelines/data/inputs.py": (*SWEEPS, "tune"),
    "pipelines/shared/names.py": ("pull", "serve", "diagnose"),
    "pipelines/reports/plots.py": QUANTIZERS,  # the no-latency note; baseline always benchmarks
    "pipelines/data/preprocessing.py": SWEEPS,
    "pipelines/registry/pull.py": ("pull",),  # the dataset check of --evaluate
    "pipelines/registry/registrar.py": QUANTIZERS,  # check_registry_targets; baseline registers nothing
    "pipelines/registry/serve.py": ("serve",),
    "pipelines/sweep/options.py": SWEEPS,
    "pipelines/sweep/inputs.py:prepare_inputs": QUANTIZERS,
    # the calibration set's size: baseline builds none; tune checks its --calibration-sizes before
    "pipelines/sweep/inputs.py:with_calibration": QUANTIZERS,
    "tracking/registry.py": ("pull", "serve"),  # bench and promote always pass exactly one of version and alias
    "tracking/experiments.py": SWEEPS,
    "pipelines/tune/tuner.py": ("tune",),
    "pipelines/reports/comparison.py:REUSED_NOTE": QUANTIZERS,  # the table of a --resume'd sweep
    "pipelines/sweep/bench.py:bench_run": ("bench",),
    "pipelines/sweep/bench.py:_check_comparable": ("bench",),
    "pipelines/sweep/variant_runs.py:VariantRuns": QUANTIZERS,  # a tracking failure mid-sweep
    "pipelines/sweep/variant_runs.py:RESUME_HINT": QUANTIZERS,
    "pipelines/registry/gate.py:decide": (*QUANTIZERS, "tune"),  # --allow-slower; baseline registers nothing
    "pipelines/tune/options.py": ("tune",),
    "pipelines/tune/study.py": ("tune",),
    "pipelines/tune/space.py": ("tune",),
    "pipelines/cli/quantizing.py:_sizes": ("tune",),
}
# Options a module names only on the commands that have them: the value the user gave, or (check_registry_targets)
# the flag of the framework the command registers.
NAMED_ONLY_WHERE_GIVEN = {
    ("pipelines/sweep/options.py", "--registered-model"),
    ("pipelines/sweep/options.py", "--registered-onnx-model"),
    ("pipelines/registry/registrar.py", "--registered-model"),
    ("pipelines/registry/registrar.py", "--registered-onnx-model"),
}
ERROR_CALLS = re.compile(r"_fail|\w*Error")


def _top_level_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return next((t.id for t in targets if isinstance(t, ast.Name)), None)


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _strings(node: ast.AST, skip: set[int]):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in skip:
            yield sub.value


def _messages_naming_options():
    """(file, top-level name, text) for every string literal (f-string parts included) that names a --option: in
    common/, pipelines/, models/ and tracking/ all of them but docstrings; in the CLI's modules only those inside
    `_fail(...)` or `...Error(...)` calls (the rest are option declarations and help texts, checked from the
    commands)."""
    folders = ("common", "pipelines", "models", "tracking")
    for path in sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), relative)
        skip = _docstrings(tree)
        for top in tree.body:
            name = _top_level_name(top)
            if relative.startswith("pipelines/cli/"):
                parts = [node for node in ast.walk(top) if isinstance(node, ast.Call)
                         and ERROR_CALLS.fullmatch(getattr(node.func, "id", getattr(node.func, "attr", "")))]
            else:
                parts = [top]
            for part in parts:
                for text in _strings(part, skip):
                    if OPTION.search(text):
                        yield relative, name, text


def _command_of_callback(name: str) -> str | None:
    return next((path for path, command in COMMANDS.items()
                 if getattr(command.callback, "__name__", None) == name), None)


def _check_named_options(text: str, commands, where: str) -> list[str]:
    """Problems with the options `text` names: those in a backticked `ptqflow COMMAND ...` must exist on that
    command, the others on every command in `commands`."""
    problems = []
    for quoted in re.findall(r"`ptqflow ([^`]*)`", text):
        words = quoted.split()
        path = next((" ".join(words[:n]) for n in range(len(words), 0, -1) if " ".join(words[:n]) in COMMANDS),
                    None)
        if path is None:
            problems.append(f"{where}: `ptqflow {quoted}` is not a command")
            continue
        problems += [f"{where}: `ptqflow {path}` has no {opt}" for opt in OPTION.findall(quoted)
                     if opt not in _options_of(COMMANDS[path])]
    rest = re.sub(r"`ptqflow [^`]*`", "", text)
    for command in commands:
        problems += [f"{where}: {opt!r} named in {text!r} is not an option of `ptqflow {command}`"
                     for opt in OPTION.findall(rest) if opt not in _options_of(COMMANDS[command])]
    return problems


def test_every_hint_names_an_option_of_the_commands_that_can_raise_it():
    problems, seen = [], 0
    for relative, name, text in _messages_naming_options():
        seen += 1
        where = f"{relative}:{name}"
        if relative.startswith("pipelines/cli/"):
            command = _command_of_callback(name)
            commands = (command,) if command else RAISED_BY.get(where)
        else:
            commands = RAISED_BY.get(where, RAISED_BY.get(relative))
        if commands is None:
            problems.append(f"{where} names an option in {text!r}: add it to RAISED_BY with the commands that can "
                            "raise it")
            continue
        for opt in OPTION.findall(text):
            if (relative, opt) in NAMED_ONLY_WHERE_GIVEN:
                if not any(opt in _options_of(COMMANDS[c]) for c in commands):
                    problems.append(f"{where}: no command has {opt}")
                text = text.replace(opt, "")
        problems += _check_named_options(text, commands, where)
    assert seen > 20  # the scan finds the messages at all
    assert not problems, "\n".join(problems)


def test_help_texts_name_only_options_of_their_own_command():
    problems = []
    for path, command in COMMANDS.items():
        texts = [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]
        for text in texts:
            problems += _check_named_options(text, (path,), f"`ptqflow {path} --help`")
    assert not problems, "\n".join(problems)


UNREACHABLE = "http://127.0.0.1:9/file"  # port 9 (discard) refuses connections here


@pytest.mark.parametrize("args,mirror_option", [
    (["sweep", "--resnet8-url", UNREACHABLE], "--resnet8-url"),
    (["baseline", "--resnet8-url", UNREACHABLE], "--resnet8-url"),
    (["quantize", "ort", "--resnet8-url", UNREACHABLE], "--resnet8-url"),
    (["sweep", "--model", "{model}", "--cifar10-url", UNREACHABLE], "--cifar10-url"),
    (["baseline", "--model", "{model}", "--cifar10-url", UNREACHABLE], "--cifar10-url"),
    (["fetch", "resnet8", "--url", UNREACHABLE, "--dest", "models"], "--url"),
    (["fetch", "cifar10", "--url", UNREACHABLE, "--dest", "data"], "--url"),
])
def test_offline_fetch_errors_name_the_commands_own_mirror_option(tracking_store, tiny_model, cifar_dir, args,
                                                                    mirror_option):
    # tracking_store is the working directory: no data/models/resnet8.onnx or data/cifar-10-batches-py, so they are fetched.
    args = [str(tiny_model) if a == "{model}" else a for a in args]
    if args[0] != "fetch" and "--model" not in args:
        args += ["--data-dir", str(cifar_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and UNREACHABLE in errors[0] and mirror_option in errors[0], result.stderr
    command = next(path for n in (2, 1) if (path := " ".join(args[:n])) in COMMANDS)
    assert not _check_named_options(errors[0], (command,), command)


# ---- no deprecation notices of torch's when a TorchScript file loads -----------------------------------------------
DEPRECATION = re.compile(r"deprecat|Warning|^\[W\d{4}", re.IGNORECASE | re.MULTILINE)


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> Path:
    import torch
    from test_engines import _int8_torchscript

    module, _, _ = _int8_torchscript("fbgemm")
    path = tmp_path_factory.mktemp("torchscript") / "tiny-int8.pt"
    torch.jit.save(module, str(path))
    return path


@pytest.fixture()
def registered_torchscript(tracking_store) -> str:
    """NAME/VERSION of a registered TorchScript int8 version (fbgemm) in the test's store."""
    from test_engines import MODEL, _register

    return f"{MODEL}/{_register(tracking_store, 'fbgemm')}"


def _assert_no_deprecation_notice(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert not DEPRECATION.search(result.stderr), result.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_bench_of_a_torchscript_file_prints_no_deprecation_notice(tmp_path, torchscript_file, cifar_dir):
    result = _run_cli("bench", torchscript_file, "--data-dir", cifar_dir, "--threads", "1", "--engine", "fbgemm",
                      cwd=tmp_path)
    _assert_no_deprecation_notice(result)
    assert "tiny-int8.pt" in result.stdout


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_pull_of_a_registered_torchscript_prints_no_deprecation_notice(tracking_store, registered_torchscript):
    name, version = registered_torchscript.split("/")
    result = _run_cli("pull", name, "--version", version, "--output", tracking_store / "pulled", cwd=tracking_store)
    _assert_no_deprecation_notice(result)
    assert "verified" in result.stdout


@pytest.mark.server
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_serve_of_a_registered_torchscript_prints_no_deprecation_notice(tracking_store, registered_torchscript):
    name, version = registered_torchscript.split("/")
    process = subprocess.Popen([sys.executable, "-m", "ptqflow", "serve", name, "--version", version,
                                "--port", "0"], cwd=tracking_store, env=_cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        first = process.stdout.readline()  # blocks until the model is loaded and the server announced
        assert first.startswith("serving "), first + process.stderr.read()
        url = re.search(r"at (http://\S+) ", first).group(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until uvicorn answers (and so handles SIGINT itself)
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    assert process.returncode == 0, stderr
    assert not DEPRECATION.search(stderr), stderr


# ---- --help at 80 columns ----------------------------------------------------------------------------------------
BOX = str.maketrans({c: " " for c in "│╭╮╰╯─"})


def _help(path: str, columns: int, monkeypatch) -> str:
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None, raising=False)  # TERMINAL_WIDTH would override
    result = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def _words(text: str) -> set[str]:
    return set(text.translate(BOX).split())


@pytest.mark.parametrize("path", ["", *COMMANDS])
def test_help_is_readable_at_80_columns(path, monkeypatch):
    narrow, wide = _help(path, 80, monkeypatch), _help(path, 250, monkeypatch)
    assert max(map(len, narrow.splitlines())) <= 80
    # Wrapping at 80 columns may only move whole words to the next line: a word cut in two ("P / ercentile") or an
    # option name cut short ("--calibration-met…") leaves pieces that the 250-column rendering does not have.
    cut = _words(narrow) - _words(wide)
    assert not cut, f"split or shortened at 80 columns: {sorted(cut)}\n{narrow}"
    lines = narrow.splitlines()
    command = COMMANDS.get(path)
    for param in command.params if command else ():
        names = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            names += [member.value for member in annotation]
        for name in names:  # every option name and every choice whole on one line
            assert any(name.lower() in line.lower() for line in lines), f"{name!r} not intact:\n{narrow}"
