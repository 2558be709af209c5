"""The package's rooms import only downward, stay small, install as one package, and docs/architecture.md draws
the import graph as it is.

Rooms, bottom first (a room may import its own modules and any room of a lower rank; `models` and `tracking` never
import each other): `ptqflow.common`; `ptqflow.models.graph`, `.runtime` and `ptqflow.tracking`; `.adaround`;
`.backends`; `.diagnosis`; then the pipelines rooms `shared`, `data`, `variants`, `reports`, `registry`, `repair`,
`sweep`, `tune`, `api`, `cli`; the package's own `__init__`/`__main__` on top.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"common": "ptqflow.common", "models": "ptqflow.models", "tracking": "ptqflow.tracking",
           "pipelines": "ptqflow.pipelines", "ptqflow": "ptqflow"}
RANKS = {
    "ptqflow.common": 0,
    "ptqflow.models.graph": 1, "ptqflow.models.runtime": 1, "ptqflow.tracking": 1,
    "ptqflow.models.adaround": 2,
    "ptqflow.models.backends": 3,
    "ptqflow.models.diagnosis": 4,
    "ptqflow.pipelines.shared": 5,
    "ptqflow.pipelines.data": 6,
    "ptqflow.pipelines.variants": 7,
    "ptqflow.pipelines.reports": 8,
    "ptqflow.pipelines.registry": 9,
    "ptqflow.pipelines.repair": 10,
    "ptqflow.pipelines.sweep": 11,
    "ptqflow.pipelines.tune": 12,
    "ptqflow.pipelines.api": 13,
    "ptqflow.pipelines.cli": 14,
    "ptqflow": 15,
}
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 600, 300, 100


def _source_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def room_of(module: str) -> str:
    """The room a dotted module name belongs to: the longest RANKS key that is it or one of its parents."""
    candidates = [room for room in RANKS if module == room or module.startswith(room + ".")]
    assert candidates, f"{module} is in no room: add its sub-package to RANKS and docs/architecture.md"
    return max(candidates, key=len)


def _imports(path: Path) -> set[str]:
    """Every ptqflow module this file imports, anywhere in it (functions included), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {n for n in names if n == "ptqflow" or n.startswith("ptqflow.")}


def import_edges() -> set[tuple[str, str]]:
    """(importing room, imported room) for every import between two different rooms."""
    edges = set()
    for module, path in _source_files().items():
        here = room_of(module)
        for name in _imports(path):
            if name == "ptqflow":
                continue
            there = room_of(name)
            if there != here and not (here == "ptqflow" and there == "ptqflow"):
                edges.add((here, there))
    return edges


def test_every_module_sits_in_a_room():
    rooms = {room_of(module) for module in _source_files()}
    assert rooms == set(RANKS)


def test_rooms_import_only_downward():
    upward = sorted(f"{a} -> {b}" for a, b in import_edges() if RANKS[b] >= RANKS[a])
    assert upward == []


def test_models_and_tracking_never_import_each_other():
    crossing = sorted(f"{a} -> {b}" for a, b in import_edges()
                      if {a.split(".")[1] if "." in a else a, b.split(".")[1] if "." in b else b} == {"models", "tracking"})
    assert crossing == []


def test_no_module_imports_another_room_through_a_private_name():
    """Rooms talk through public names: `from ptqflow.x import _helper` across rooms is reaching in."""
    private = []
    for module, path in _source_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ptqflow."):
                if room_of(node.module) != room_of(module):
                    private += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def _long_definitions(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
            found.append(f"class {node.name}: {node.end_lineno - node.lineno + 1} lines")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"def {node.name}: {node.end_lineno - node.lineno + 1} lines")
    return found


def test_rooms_are_small():
    """No module over 600 lines, no class over 300, no function over 100 (tests and benchmarks aside)."""
    problems = {}
    for module, path in _source_files().items():
        text = path.read_text()
        lines = len(text.splitlines())
        found = [f"{lines} lines"] if lines > MAX_MODULE_LINES else []
        found += _long_definitions(ast.parse(text))
        if found:
            problems[module] = found
    assert problems == {}


def test_architecture_doc_draws_the_import_graph_as_it_is():
    """docs/architecture.md lists, in its `imports` block, each room and the rooms it imports: exactly the edges the
    source has, so the drawing cannot drift from the code."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```text imports\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```text imports block"
    documented = set()
    for line in block.group(1).strip().splitlines():
        room, _, imported = line.partition("->")
        documented |= {(room.strip(), other.strip()) for other in imported.split(",") if other.strip()}
    assert documented == import_edges()


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
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", code, *packages], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_all_of_models_and_tracking_loads_nothing_of_pipelines():
    loaded = _modules_loaded_by_importing(("ptqflow.models", "ptqflow.tracking"))
    assert "ptqflow.models.adaround" in loaded and "ptqflow.tracking.runs" in loaded  # the walk really imported them
    assert [m for m in loaded if m.startswith("ptqflow.pipelines")] == []


def test_importing_common_loads_no_other_layer():
    loaded = _modules_loaded_by_importing(("ptqflow.common",))
    assert "ptqflow.common.files" in loaded
    assert [m for m in loaded if m.startswith(("ptqflow.models", "ptqflow.tracking", "ptqflow.pipelines", "mlflow",
                                               "numpy", "torch"))] == []


def test_the_variant_runner_imports_neither_mlflow_nor_tracking():
    """The runner quantizes, evaluates and benchmarks without an experiment tracker (the API with track=False)."""
    loaded = _modules_loaded_by_importing(("ptqflow.pipelines.variants.runner",))
    assert "ptqflow.pipelines.variants.runner" in loaded
    assert [m for m in loaded if m.split(".")[0] == "mlflow" or m.startswith("ptqflow.tracking")] == []


def test_every_package_folder_is_installed_by_pyproject():
    """pyproject maps each folder into `ptqflow` and lists every sub-package, so a wheel ships all of them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    on_disk = {module for module, path in _source_files().items() if path.name == "__init__.py"}
    assert sorted(setuptools["packages"]) == sorted(on_disk)


@pytest.mark.slow
def test_the_wheel_installs_one_package_named_ptqflow(tmp_path):
    """`pip install --no-deps --target DIR .` leaves only ptqflow, its dist-info and its script in DIR."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("ptqflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"ptqflow", dist_info}
    expected = {f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder, package in FOLDERS.items() for path in (ROOT / folder).rglob("*.py")}
    assert {name for name in names if name.endswith(".py")} == expected
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "ptqflow = ptqflow.pipelines.cli.app:app" in entry_points
