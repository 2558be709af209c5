"""Hostile and broken inputs get nowhere: code-running pickles, ONNX external data pointing out of the model's
folder, garbage in every loader (property-based), and a sweep that never leaves the machine.

Every case must end in a PtqflowError (one `error:` line in the CLI), run nothing, write nothing outside the
output directories and leave no MLflow run RUNNING.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from cifar_fixture import _dict, _list, _string, _uint8_matrix, py2_pickle
from conftest import CALIBRATION_SIZE, all_runs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data
from onnx_fixture import tiny_cnn, write_tiny_cnn
from test_cli import assert_nothing_running, assert_one_line_error, sweep_args
from test_keras_resnet8 import random_weights, resnet8_model_config, write_keras_h5
from typer.testing import CliRunner

from ptqflow.common.errors import ConfigError, DataError, FetchError, ModelError, PtqflowError
from ptqflow.models.graph.keras_resnet8 import convert_h5_to_onnx
from ptqflow.models.graph.onnx_model import load_classifier
from ptqflow.pipelines.data.cifar import ALL_FILES, META_FILE, load_cifar10
from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.data.fetch import safe_extract_tar
from ptqflow.pipelines.shared.names import validate_name, validate_output_dir

# PTQFLOW_FUZZ_EXAMPLES=2000 runs a deeper (slower) search locally; CI keeps the default, derandomized.
FUZZ = settings(max_examples=int(os.environ.get("PTQFLOW_FUZZ_EXAMPLES", "100")), deadline=None,
                derandomize="PTQFLOW_FUZZ_EXAMPLES" not in os.environ, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------------
# Pickles that run code
# ---------------------------------------------------------------------------------------------------------------

def _u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _stack_global(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + b"\x93"


def _exploits(marker: Path, tmp: Path) -> dict[str, bytes]:
    """Payloads that each create `marker` when unpickled by plain `pickle.loads` (checked by the control test)."""
    shell = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').close()"
    evil_npy = tmp / "evil.npy"  # numpy.load(..., allow_pickle=True) unpickles it: a second-stage os.system
    evil_npy.write_bytes(b"\x80\x02" + _global("os", "system") + b"(" + _u(shell) + b"tR.")
    return {
        "os.system (GLOBAL+REDUCE)": _global("os", "system") + b"(" + _u(shell) + b"tR",
        "posix.system (STACK_GLOBAL)": _stack_global("posix", "system") + b"(" + _u(shell) + b"tR",
        "builtins.eval": _global("builtins", "eval") + b"(" + _u(f"exec({python!r})") + b"tR",
        "__builtin__.exec (py2 name)": _global("__builtin__", "exec") + b"(" + _u(python) + b"tR",
        "subprocess.Popen (INST)": b"(" + b"(" + _u("touch") + _u(str(marker)) + b"l" + b"isubprocess\nPopen\n",
        "subprocess.check_call (OBJ)": (b"(" + _global("subprocess", "check_call") + b"(" + _u("touch")
                                        + _u(str(marker)) + b"l" + b"o"),
        "numpy.load allow_pickle": (_global("numpy", "load") + b"(" + _u(str(evil_npy)) + b"N\x88tR"),
        "numpy.testing runstring": (_global("numpy.testing._private.utils", "runstring") + b"(" + _u(python)
                                    + b"}tR"),
        "numpy.core.multiarray other attr": (_global("numpy.core.multiarray", "__builtins__") + b"0"
                                             + _global("os", "system") + b"(" + _u(shell) + b"tR"),
        "builtins.getattr": (_global("builtins", "getattr") + b"(" + _u("os") + _u(
            "system") + b"tR"),
    }


def _batch_with(value: bytes) -> bytes:
    """A protocol-2 data batch whose 'data' entry is the given pickle fragment."""
    return b"\x80\x02}(" + _string(b"data") + value + _string(b"labels") + _list([b"K\x00"]) + b"u."


def _wait_for(path: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


CONTROL_CASES = ("os.system (GLOBAL+REDUCE)", "builtins.eval", "subprocess.Popen (INST)",
                 "subprocess.check_call (OBJ)", "numpy.load allow_pickle")


@pytest.mark.parametrize("case", CONTROL_CASES)
def test_exploit_payloads_really_run_code_under_plain_pickle(tmp_path, case):
    """Control: the payloads are live ammunition, so the refusal tests below prove something."""
    import pickle

    marker = tmp_path / "control"
    result = pickle.loads(b"\x80\x02" + _exploits(marker, tmp_path)[case] + b".", encoding="bytes")
    if hasattr(result, "wait"):
        result.wait()
    assert _wait_for(marker, 5)


@pytest.fixture()
def data_copy(cifar_dir, tmp_path) -> Path:
    target = tmp_path / "data" / "cifar-10-batches-py"
    shutil.copytree(cifar_dir, target)
    return target


@pytest.mark.parametrize("file_name", ["data_batch_1", "test_batch", META_FILE])
def test_code_running_pickles_are_refused_and_never_run(tmp_path, data_copy, file_name):
    marker = tmp_path / "pwned"
    for case, payload in _exploits(marker, tmp_path).items():
        (data_copy / file_name).write_bytes(_batch_with(payload))
        with pytest.raises(DataError) as caught:
            load_cifar10(data_copy)
        message = str(caught.value)
        assert "\n" not in message and file_name in message, (case, message)
    assert not _wait_for(marker, 0.3)


def test_codecs_other_than_latin1_are_refused(data_copy):
    for codec in ("nonexistent-codec", "rot13", "zlib", "hex"):
        payload = _global("_codecs", "encode") + b"(" + _u("abc") + _u(codec) + b"tR"
        (data_copy / "data_batch_2").write_bytes(_batch_with(payload))
        with pytest.raises(DataError, match="not allowed"):
            load_cifar10(data_copy)


def _meta_with(value: bytes) -> bytes:
    return b"\x80\x02}(" + _string(b"label_names") + b"(" + value * 10 + b"lu."


@pytest.mark.parametrize("file_name, content", [
    # bytearray(2**31 - 1): 2 GB from 30 bytes of pickle (10 of them, then str()-ed as class names, used to
    # exhaust memory).
    ("batches.meta", _meta_with(_global("__builtin__", "bytearray") + b"(J\xff\xff\xff\x7ftR")),
    # _reconstruct(ndarray, (2**31, 3072), 'u1') would allocate a 6 TB (or, smaller, a real multi-GB) 'data' array
    # that the file does not hold.
    ("data_batch_1", _batch_with(_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
                                 + b"(J\x00\x00\x01\x00M\x00\x0ct" + _string(b"u1") + b"\x87R")),
], ids=["bytearray-size", "reconstruct-shape"])
def test_memory_bombs_are_refused_before_allocating(data_copy, file_name, content):
    (data_copy / file_name).write_bytes(content)
    with pytest.raises(DataError, match="allowed"):
        load_cifar10(data_copy)


def test_class_names_must_be_short_strings(data_copy):
    (data_copy / META_FILE).write_bytes(_meta_with(b"K\x01"))
    with pytest.raises(DataError, match="class names"):
        load_cifar10(data_copy)


def test_cli_refuses_code_running_pickle_with_one_line(tracking_store, tiny_model, data_copy):
    marker = tracking_store / "pwned"
    (data_copy / "data_batch_4").write_bytes(_batch_with(_exploits(marker, tracking_store)["builtins.eval"]))
    result = CliRunner().invoke(app, [str(a) for a in sweep_args(tiny_model, data_copy)])
    assert_one_line_error(result, "data_batch_4", "not allowed")
    assert not marker.exists()
    assert all_runs() == []


# ---------------------------------------------------------------------------------------------------------------
# ONNX external data
# ---------------------------------------------------------------------------------------------------------------

def _external_model(folder: Path, location: str = "weights.bin") -> tuple[Path, onnx.ModelProto]:
    """The tiny CNN saved with every initializer in one external file next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_cnn()
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=0)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path, tiny_cnn()


def _point_tensor_at(path: Path, location: str, tensor_name: str = "w1") -> None:
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture()
def secret(tmp_path) -> Path:
    """A file outside the model folder, big enough to satisfy any offset/length in the model."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret.bin"
    target.write_bytes(os.urandom(64 * 1024))
    return target


_WATCHED: list[str] = []  # paths the audit hook reports when Python opens them
_OPENED: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and _WATCHED and args and isinstance(args[0], (str, bytes, os.PathLike)):
        opened = os.fsdecode(args[0])
        if any(os.path.realpath(opened) == watched for watched in _WATCHED):
            _OPENED.append(opened)


sys.addaudithook(_audit)


@pytest.fixture()
def no_reads_of(monkeypatch):
    """Record any attempt to read external data (onnx's loader, its C++ opener, or a Python open of a watched
    file); yields a function that watches a path."""
    import onnx.external_data_helper as edh

    attempts: list[str] = []

    def recorder(name, original):
        def wrapper(*args, **kwargs):
            attempts.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in ("load_external_data_for_model", "load_external_data_for_tensor", "_open_external_data_fd"):
        monkeypatch.setattr(edh, name, recorder(name, getattr(edh, name)))
    monkeypatch.setattr(onnx, "load_external_data_for_model", recorder("onnx.load_external_data_for_model",
                                                                       onnx.load_external_data_for_model))
    _OPENED.clear()

    def watch(path: Path) -> list[str]:
        """From now on, record reads of external data (building the model above may have written some)."""
        attempts.clear()
        _WATCHED.append(os.path.realpath(path))
        return attempts

    yield watch
    _WATCHED.clear()
    assert _OPENED == [], f"a watched file was opened: {_OPENED}"


def test_legit_external_data_in_the_same_folder_loads(tmp_path):
    path, reference = _external_model(tmp_path / "m")
    assert (tmp_path / "m" / "weights.bin").stat().st_size > 0
    model = load_classifier(path)
    loaded = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    for tensor in reference.graph.initializer:
        np.testing.assert_array_equal(loaded[tensor.name], numpy_helper.to_array(tensor))
        assert not [t for t in model.proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert model.input.layout == "NHWC"


def test_legit_external_data_in_a_subfolder_loads(tmp_path):
    (tmp_path / "m" / "data").mkdir(parents=True)
    path, _ = _external_model(tmp_path / "m", location="data/weights.bin")
    assert load_classifier(path).output_name == "Identity:0"


@pytest.mark.parametrize("how", ["dotdot", "dotdot-etc-passwd", "absolute", "symlink-file", "symlink-dir",
                                 "file-url-like"])
def test_external_data_outside_the_model_folder_is_refused_before_reading(tmp_path, secret, no_reads_of, how):
    folder = tmp_path / "m"
    path, _ = _external_model(folder)
    location = {
        "dotdot": "../outside/secret.bin",
        "dotdot-etc-passwd": "../../../../../../../../etc/passwd",
        "absolute": str(secret),
        "symlink-file": "link.bin",
        "symlink-dir": "linkdir/secret.bin",
        "file-url-like": "weights.bin/../../outside/secret.bin",
    }[how]
    if how == "symlink-file":
        (folder / "link.bin").symlink_to(secret)
    if how == "symlink-dir":
        (folder / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    _point_tensor_at(path, location)
    attempts = no_reads_of(secret)
    no_reads_of(Path("/etc/passwd"))
    with pytest.raises(ModelError, match="outside the model's folder") as caught:
        load_classifier(path)
    assert "\n" not in str(caught.value)
    assert attempts == []


def test_external_data_in_a_nested_subgraph_is_checked(tmp_path, secret, no_reads_of):
    """An If node's branch holds a Constant whose tensor points outside: refused like a top-level initializer."""
    folder = tmp_path / "m"
    folder.mkdir()
    model = tiny_cnn()
    hidden = TensorProto(name="hidden", data_type=TensorProto.FLOAT, dims=[4])
    hidden.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../outside/secret.bin"), ("offset", "0"), ("length", "16")):
        hidden.external_data.add(key=key, value=value)
    inner = helper.make_graph([helper.make_node("Constant", [], ["k"], value=hidden)], "inner", [],
                              [helper.make_tensor_value_info("k", TensorProto.FLOAT, [4])])
    deeper = helper.make_graph([helper.make_node("If", ["cond"], ["k2"], then_branch=inner, else_branch=inner)],
                               "deeper", [], [helper.make_tensor_value_info("k2", TensorProto.FLOAT, [4])])
    model.graph.node.append(helper.make_node("If", ["cond"], ["unused"], then_branch=deeper, else_branch=deeper))
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    attempts = no_reads_of(secret)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_classifier(path)
    assert attempts == []


def test_external_data_of_a_sparse_initializer_is_checked(tmp_path, secret, no_reads_of):
    folder = tmp_path / "m"
    folder.mkdir()
    model = tiny_cnn()
    values = TensorProto(name="sparse_values", data_type=TensorProto.FLOAT, dims=[2])
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value=str(secret))
    indices = numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "sparse_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    attempts = no_reads_of(secret)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_classifier(path)
    assert attempts == []


@pytest.mark.parametrize("how, message", [
    ("missing", "missing or not a regular file"),
    ("directory", "missing or not a regular file"),
    ("beyond-end", "beyond the end"),
    ("negative-offset", "not a non-negative integer"),
    ("nul-byte", "unusable external data location"),
    ("empty-location", "names no location"),
])
def test_broken_external_data_is_one_model_error(tmp_path, how, message):
    folder = tmp_path / "m"
    path, _ = _external_model(folder)
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "wd")
    entries = {e.key: e for e in tensor.external_data}
    if how == "missing":
        entries["location"].value = "nope.bin"
    elif how == "directory":
        (folder / "adir").mkdir()
        entries["location"].value = "adir"
    elif how == "beyond-end":
        entries["length"].value = str(10 ** 12)
    elif how == "negative-offset":
        entries["offset"].value = "-8"
    elif how == "nul-byte":
        entries["location"].value = "weights\0.bin"
    elif how == "empty-location":
        entries["location"].value = ""
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=message) as caught:
        load_classifier(path)
    assert "\n" not in str(caught.value)


def test_truncated_and_random_onnx_files_are_model_errors(tmp_path, tiny_model):
    raw = tiny_model.read_bytes()
    for name, content in (("truncated", raw[: len(raw) // 2]), ("truncated-header", raw[:7]),
                          ("random", os.urandom(4096)), ("empty", b"")):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        with pytest.raises(ModelError):
            load_classifier(path)


def test_external_data_is_part_of_the_model_digest(tmp_path):
    from ptqflow.common.files import file_sha256

    path, _ = _external_model(tmp_path / "m")
    first = load_classifier(path)
    assert first.external_files == (Path("weights.bin"),)
    assert first.sha256 != file_sha256(path)
    assert first.size_bytes == path.stat().st_size + (tmp_path / "m" / "weights.bin").stat().st_size
    data = bytearray((tmp_path / "m" / "weights.bin").read_bytes())
    data[-1] ^= 0x01  # one weight changes; the .onnx file does not
    (tmp_path / "m" / "weights.bin").write_bytes(bytes(data))
    assert load_classifier(path).sha256 != first.sha256
    embedded = write_tiny_cnn(tmp_path / "embedded" / "model.onnx")
    assert load_classifier(embedded).sha256 == file_sha256(embedded)  # unchanged for self-contained models


def test_sweep_logs_external_data_beside_the_model_file(tracking_store, cifar_dir):
    import mlflow

    (tracking_store / "m" / "data").mkdir(parents=True)
    path, _ = _external_model(tracking_store / "m", location="data/weights.bin")
    result = CliRunner().invoke(app, ["sweep", "--model", str(path), "--data-dir", str(cifar_dir), "--no-bench",
                                      "--calibration-size", str(CALIBRATION_SIZE), "--weight-rounding", "nearest",
                                      "--variant", "ort-int8"])
    assert result.exit_code == 0, result.output
    fp32 = next(r for r in all_runs() if r.info.run_name == "fp32")
    logged = mlflow.artifacts.download_artifacts(run_id=fp32.info.run_id, artifact_path="model_file",
                                                 dst_path=str(tracking_store / "pulled"))
    original = tracking_store / "m" / "data" / "weights.bin"
    assert (Path(logged) / "data" / "weights.bin").read_bytes() == original.read_bytes()
    assert load_classifier(Path(logged) / "model.onnx").sha256 == load_classifier(path).sha256
    assert fp32.data.tags["ptqflow.model_sha256"] == load_classifier(path).sha256


@pytest.mark.parametrize("how", ["dotdot", "symlink"])  # absolute: covered without the CLI above
def test_cli_sweep_refuses_external_data_outside_with_one_line(tracking_store, cifar_dir, secret, how):
    folder = tracking_store / "m"
    path, _ = _external_model(folder)
    if how == "symlink":
        (folder / "link.bin").symlink_to(secret)
    _point_tensor_at(path, {"dotdot": "../outside/secret.bin", "absolute": str(secret), "symlink": "link.bin"}[how])
    before = sorted(p.relative_to(tracking_store) for p in tracking_store.rglob("*") if p.name != "mlflow.db")
    result = CliRunner().invoke(app, ["sweep", "--model", str(path), "--data-dir", str(cifar_dir),
                                      "--calibration-size", str(CALIBRATION_SIZE)])
    assert_one_line_error(result, "outside the model's folder")
    assert all_runs() == []
    assert_nothing_running()
    after = sorted(p.relative_to(tracking_store) for p in tracking_store.rglob("*") if p.name != "mlflow.db")
    assert [p for p in after if p not in before and not str(p).startswith("mlruns")] == []


# ---------------------------------------------------------------------------------------------------------------
# Names and output directories
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["resnet8-quantization", "resnet8-int8", "ort-int8", "a", "v1.2_rc-3",
                                   "Model.onnx", "x" * 100, "0start"])
def test_safe_names_pass_unchanged(value):
    assert validate_name("--experiment", value) == value


@pytest.mark.parametrize("value", ["", " lead", "trail ", "a/b", "../x", "a..b", "..", ".", ".hidden", "-flag",
                                   "_x", "a\\b", "a#b", "a%2e", "a\nb", "a\tb", "a\x00b", "a\x7fb", "a b",
                                   "models:/x", "x@latest", "é", "x" * 101, "a\n"])
def test_unsafe_names_are_one_config_error_line(value):
    with pytest.raises(ConfigError) as caught:
        validate_name("--registered-model", value)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith("--registered-model")
    assert "letters, digits" in message
    if value:
        assert repr(value)[:60] in message


def test_validate_name_refuses_non_text():
    with pytest.raises(ConfigError, match="must be text"):
        validate_name("variant name", None)  # type: ignore[arg-type]


@given(st.text(max_size=120))
@settings(max_examples=200, deadline=None)
def test_validate_name_accepts_exactly_the_documented_alphabet(value):
    import re

    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value) is not None and ".." not in value
    try:
        assert validate_name("alias", value) == value and ok
    except ConfigError as exc:
        assert not ok and "\n" not in str(exc)


def test_validate_output_dir(tmp_path):
    assert validate_output_dir(tmp_path / "new") == tmp_path / "new"
    assert validate_output_dir(str(tmp_path)) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        validate_output_dir(tmp_path / "file")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(ConfigError, match="symlink"):
        validate_output_dir(tmp_path / "link")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="symlink"):
        validate_output_dir(tmp_path / "dangling")
    for bad in ("", "out\ndir", "x" * 5000):
        with pytest.raises(ConfigError) as caught:
            validate_output_dir(bad if bad != "x" * 5000 else tmp_path / bad)
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Property-based: garbage into every loader gives only PtqflowError
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def mutations(draw, valid: bytes):
    """valid with some bytes overwritten, a slice deleted or duplicated, and/or truncated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "delete", "insert", "duplicate"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at: at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at] = data[at: at + draw(st.integers(1, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def garbage(valid: bytes):
    return st.one_of(st.binary(max_size=2048), mutations(valid))


# Pickle fragments a fuzzed batch is assembled from: CIFAR's own allowed globals and opcodes, plus forbidden ones.
_PICKLE_PIECES = [
    _global("numpy.core.multiarray", "_reconstruct"), _global("numpy._core.multiarray", "_reconstruct"),
    _global("numpy", "ndarray"), _global("numpy", "dtype"), _global("numpy.core.multiarray", "scalar"),
    _global("_codecs", "encode"), _global("__builtin__", "bytearray"), _global("os", "system"),
    _stack_global("numpy", "dtype"), b"(", b")", b"t", b"R", b"b", b"]", b"}", b"u", b"a", b"e", b"l", b"d", b"s",
    b"N", b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"K\x00", b"K\x03", b"K\x0a", b"J\xff\xff\xff\x7f",
    b"J\x00\x00\x00\x80", b"\x8a\x09" + b"\xff" * 9, b"U\x02u1", b"U\x01|", b"U\x01b", b"U\x04data",
    b"U\x06labels", b"U\x0blabel_names", _u("latin1"), _u("O"), _u("<f8"), b"U\x0c" + bytes(range(12)),
    b"h\x00", b"h\x01", b"q\x00", b"q\x01", b"0", b"2", b"\x8f", b"\x90", b"\x91", b"\x94", b"\x95",
    b"\x82\x01", b"G\x7f\xf0\x00\x00\x00\x00\x00\x00", b"C\x03abc", b"B\x00\x30\x00\x00" + b"\x00" * 16,
]


@st.composite
def pickle_programs(draw):
    """Random protocol-2 programs over CIFAR's opcodes and globals: reach deep into the restricted unpickler."""
    pieces = draw(st.lists(st.sampled_from(_PICKLE_PIECES), max_size=40))
    prefix = draw(st.sampled_from([b"\x80\x02", b"\x80\x02}(U\x04data", b"\x80\x02}(U\x0blabel_names](",
                                   b"\x80\x02}(U\x06labels"]))
    return prefix + b"".join(pieces) + draw(st.sampled_from([b".", b"u.", b"eu.", b""]))


@pytest.fixture(scope="module")
def fuzz_data(cifar_dir, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("fuzz_data") / "cifar-10-batches-py"
    shutil.copytree(cifar_dir, target)
    return target


def _expect_only_ptqflow_errors(call, expected: type[PtqflowError] = PtqflowError) -> None:
    """call() may succeed (a harmless mutation) or raise `expected` with a one-line message; any other exception
    (IndexError, OSError, ...) propagates and fails the test."""
    try:
        call()
    except PtqflowError as exc:
        assert isinstance(exc, expected), f"{type(exc).__name__}: {exc}"
        assert "\n" not in str(exc), str(exc)


def _cifar_examples(valid: bytes):
    return st.one_of(garbage(valid), pickle_programs())


@given(st.data())
@FUZZ
def test_fuzzed_cifar_files_give_only_data_errors(fuzz_data, data):
    name = data.draw(st.sampled_from(ALL_FILES), label="file")
    target = fuzz_data / name
    valid = target.read_bytes()
    try:
        target.write_bytes(data.draw(_cifar_examples(valid), label="content"))
        _expect_only_ptqflow_errors(lambda: load_cifar10(fuzz_data), DataError)
    finally:
        target.write_bytes(valid)


def _valid_meta_and_batch() -> tuple[bytes, bytes]:
    labels = list(range(10))
    batch = py2_pickle(_dict([(b"labels", _list([b"K" + bytes([v]) for v in labels])),
                              (b"data", _uint8_matrix(np.zeros((10, 3072), np.uint8)))]))
    meta = py2_pickle(_dict([(b"label_names", _list([_string(b"c%d" % i) for i in range(10)]))]))
    return meta, batch


@given(st.data())
@FUZZ
def test_fuzzed_small_pickles_give_only_data_errors(fuzz_data, data):
    """Mutations of a 10-image batch and a meta file: small inputs, so mutations hit structure, not pixels."""
    meta, batch = _valid_meta_and_batch()
    name = data.draw(st.sampled_from([META_FILE, "data_batch_3", "test_batch"]), label="file")
    target = fuzz_data / name
    valid = target.read_bytes()
    try:
        target.write_bytes(data.draw(mutations(meta if name == META_FILE else batch), label="content"))
        _expect_only_ptqflow_errors(lambda: load_cifar10(fuzz_data), DataError)
    finally:
        target.write_bytes(valid)


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """A folder for fuzzed models, holding a legit external data file, plus an embedded and an external model."""
    folder = tmp_path_factory.mktemp("fuzz_models")
    embedded = write_tiny_cnn(folder / "embedded.onnx").read_bytes()
    external = _external_model(folder)[0].read_bytes()
    return folder, embedded, external


@given(st.data())
@FUZZ
def test_fuzzed_onnx_files_give_only_model_errors(fuzz_models, data):
    folder, embedded, external = fuzz_models
    content = data.draw(st.one_of(garbage(embedded), mutations(external)), label="content")
    path = folder / "fuzzed.onnx"
    path.write_bytes(content)
    _expect_only_ptqflow_errors(lambda: load_classifier(path), ModelError)


def _tiny_keras_config() -> dict:
    """A small Keras functional model the converter accepts: Input, Conv+BN+ReLU, pooling, Dense softmax."""
    full = resnet8_model_config()
    layers = {layer["name"]: layer for layer in full["config"]["layers"]}
    keep = ["input_1", "conv2d", "batch_normalization", "activation"]
    pool = {"class_name": "AveragePooling2D", "name": "pool",
            "config": {"name": "pool", "pool_size": [32, 32], "strides": [32, 32], "padding": "valid",
                       "data_format": "channels_last"}, "inbound_nodes": [[["activation", 0, 0, {}]]]}
    flat = {"class_name": "Flatten", "name": "flatten", "config": {"name": "flatten", "data_format": "channels_last"},
            "inbound_nodes": [[["pool", 0, 0, {}]]]}
    dense = dict(layers["dense"], inbound_nodes=[[["flatten", 0, 0, {}]]])
    return {"class_name": "Functional",
            "config": {"name": "tiny", "layers": [layers[n] for n in keep] + [pool, flat, dense],
                       "input_layers": [["input_1", 0, 0]], "output_layers": [["dense", 0, 0]]}}


@pytest.fixture(scope="module")
def fuzz_h5(tmp_path_factory) -> tuple[Path, dict, dict, bytes]:
    folder = tmp_path_factory.mktemp("fuzz_h5")
    config = _tiny_keras_config()
    weights = random_weights(config, seed=0)
    valid = write_keras_h5(folder / "valid.h5", config, weights)
    convert_h5_to_onnx(valid, folder / "valid.onnx")  # the unmutated file converts
    return folder, config, weights, valid.read_bytes()


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4),
                     max_leaves=10)


@st.composite
def config_mutations(draw, config: dict):
    """The model config with one value somewhere replaced by arbitrary JSON, or one key dropped."""
    config = json.loads(json.dumps(config))
    node, parents = config, []
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        parents.append((node, key))
        node = node[key]
    if not parents:
        return draw(_json)
    container, key = parents[-1]
    if isinstance(container, dict) and draw(st.booleans()):
        del container[key]
    else:
        container[key] = draw(_json)
    return config


@given(st.data())
@FUZZ
def test_fuzzed_keras_files_give_only_model_errors(fuzz_h5, data):
    folder, config, weights, valid = fuzz_h5
    path, out = folder / "fuzzed.h5", folder / "fuzzed.onnx"
    if data.draw(st.booleans(), label="mutate the config rather than the bytes"):
        write_keras_h5(path, config, weights)
        with h5py.File(path, "r+") as h5:
            h5.attrs["model_config"] = json.dumps(data.draw(config_mutations(config), label="config"))
    else:
        path.write_bytes(data.draw(garbage(valid), label="content"))
    _expect_only_ptqflow_errors(lambda: convert_h5_to_onnx(path, out), ModelError)


def _tar_bytes(compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, content in (("cifar-10-batches-py/batches.meta", b"m" * 40),
                              ("cifar-10-batches-py/data_batch_1", b"d" * 300)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        directory = tarfile.TarInfo("cifar-10-batches-py/sub")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fuzz_tar_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_tar")


@given(st.data())
@FUZZ
def test_fuzzed_tar_archives_give_only_fetch_errors_and_stay_inside(fuzz_tar_dir, data):
    compression = data.draw(st.sampled_from(["", "gz", "bz2", "xz"]), label="compression")
    content = data.draw(garbage(_tar_bytes(compression)), label="content")
    work = Path(tempfile.mkdtemp(dir=fuzz_tar_dir))
    try:
        archive = work / "archive.tar"
        archive.write_bytes(content)
        _expect_only_ptqflow_errors(lambda: safe_extract_tar(archive, work / "dest"), FetchError)
        assert sorted(p.name for p in work.iterdir()) in (["archive.tar"], ["archive.tar", "dest"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# No network
# ---------------------------------------------------------------------------------------------------------------

_LOOPBACK = {"127.0.0.1", "::1", "localhost", "::ffff:127.0.0.1"}


def test_sweep_never_connects_beyond_loopback(tracking_store, tiny_model, cifar_dir, monkeypatch):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    attempts: list[object] = []

    def allowed(address) -> bool:
        if isinstance(address, (str, bytes)):  # AF_UNIX path (or abstract namespace)
            return True
        return isinstance(address, tuple) and bool(address) and str(address[0]) in _LOOPBACK

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection, real_getaddrinfo = socket.create_connection, socket.getaddrinfo

    def connect(self, address):
        if self.family == socket.AF_UNIX or allowed(address):
            return real_connect(self, address)
        attempts.append(("connect", address))
        raise OSError(f"test forbids connecting to {address!r}")

    def connect_ex(self, address):
        if self.family == socket.AF_UNIX or allowed(address):
            return real_connect_ex(self, address)
        attempts.append(("connect_ex", address))
        raise OSError(f"test forbids connecting to {address!r}")

    def create_connection(address, *args, **kwargs):
        if allowed(address):
            return real_create_connection(address, *args, **kwargs)
        attempts.append(("create_connection", address))
        raise OSError(f"test forbids connecting to {address!r}")

    def getaddrinfo(host, *args, **kwargs):
        if host is None or (host.decode() if isinstance(host, bytes) else str(host)) in _LOOPBACK:
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror(socket.EAI_NONAME, f"test forbids resolving {host!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    bench=False, variants=("ort-int8",), test_limit=20, weight_rounding="nearest"))
    assert attempts == []
    assert not result.failed
    assert {o.name for o in result.outcomes} >= {"ort-int8"}
    assert_nothing_running()
