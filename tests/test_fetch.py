"""Downloading, resuming, verifying and safely extracting, against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cifar_fixture import write_cifar_dir
from http_fixture import LocalHttpServer
from ptqflow.common.errors import DataError, FetchError, IntegrityError
from ptqflow.pipelines.data.cifar import load_cifar10
from ptqflow.pipelines.data.fetch import (CIFAR10_ARCHIVE_NAME, CIFAR10_DIR_NAME, RESNET8_H5_NAME, RESNET8_ONNX_NAME,
                             VERIFIED_MARKER, download, fetch_cifar10, fetch_resnet8, safe_extract_tar)
from test_keras_resnet8 import write_resnet8_h5

BLOB = bytes(range(256)) * 800  # 204,800 bytes: several read chunks


@pytest.fixture
def server():
    with LocalHttpServer() as running:
        yield running


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_gz(add_members) -> bytes:
    """A .tar.gz made in memory; add_members(tar) adds the members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add_members(tar)
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    tar.addfile(info)


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> bytes:
    """A tiny CIFAR-10 in the official layout, packed like the official tarball (top dir cifar-10-batches-py/)."""
    root = write_cifar_dir(tmp_path_factory.mktemp("cifar") / CIFAR10_DIR_NAME, train_per_class=2,
                           test_per_class=1)
    return tar_gz(lambda tar: tar.add(root, arcname=CIFAR10_DIR_NAME))


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --- download ---------------------------------------------------------------------------------------------

def test_download_verifies_and_renames_into_place(server, tmp_path):
    server.files["/blob"] = BLOB
    target = download(server.url("/blob"), tmp_path / "sub" / "blob.bin", md5=md5_of(BLOB),
                      sha256=hashlib.sha256(BLOB).hexdigest(), progress=True)
    assert target == tmp_path / "sub" / "blob.bin"
    assert target.read_bytes() == BLOB
    assert listing(tmp_path) == ["sub", "sub/blob.bin"]


def test_interrupted_download_resumes_with_range_request(server, tmp_path):
    server.files["/blob"] = BLOB
    server.state.drop_after["/blob"] = 50_000
    target = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match=r"stopped after 50000 of 204800 bytes.*run the command again"):
        download(server.url("/blob"), target, md5=md5_of(BLOB), progress=False)
    assert not target.exists()
    assert (tmp_path / "blob.bin.part").stat().st_size == 50_000

    download(server.url("/blob"), target, md5=md5_of(BLOB), progress=False)

    assert [r.range for r in server.requests] == [None, "bytes=50000-"]
    assert target.read_bytes() == BLOB
    assert not (tmp_path / "blob.bin.part").exists()


def test_download_starts_over_when_server_ignores_range(server, tmp_path):
    server.files["/blob"] = BLOB
    server.state.honour_range = False
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes from another file")
    target = download(server.url("/blob"), tmp_path / "blob.bin", md5=md5_of(BLOB), progress=False)
    assert server.requests[0].range == "bytes=29-"
    assert target.read_bytes() == BLOB


def test_download_starts_over_when_partial_is_not_shorter(server, tmp_path):
    server.files["/blob"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(b"\0" * len(BLOB))  # complete length, wrong bytes: answer 416
    target = download(server.url("/blob"), tmp_path / "blob.bin", md5=md5_of(BLOB), progress=False)
    assert [r.range for r in server.requests] == [f"bytes={len(BLOB)}-", None]
    assert target.read_bytes() == BLOB


def test_digest_mismatch_deletes_partial_file(server, tmp_path):
    server.files["/blob"] = BLOB
    with pytest.raises(IntegrityError, match="MD5 .* expected 0+: .*--md5"):
        download(server.url("/blob"), tmp_path / "blob.bin", md5="0" * 32, progress=False)
    with pytest.raises(IntegrityError, match="SHA256"):
        download(server.url("/blob"), tmp_path / "blob.bin", sha256="0" * 64, progress=False)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("status, words", [(404, "HTTP 404 Not Found"), (500, "HTTP 500 Internal Server Error")])
def test_http_error_is_a_one_line_fetch_error(server, tmp_path, status, words):
    url = server.url("/missing")
    if status != 404:
        server.state.statuses["/missing"] = status
    with pytest.raises(FetchError) as caught:
        download(url, tmp_path / "f", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert url in message and words in message and "--url" in message
    assert listing(tmp_path) == []


def test_connection_refused_is_a_fetch_error(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match=rf"could not reach http://127.0.0.1:{port}/f \(Connection refused\)"):
        download(f"http://127.0.0.1:{port}/f", tmp_path / "f", progress=False)


def test_dns_failure_is_a_fetch_error(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # real lookups could wait for a resolver timeout
    with pytest.raises(FetchError, match=r"could not reach https://mirror.invalid/f \(Name or service not known\)"
                                         r"; pass --url"):
        download("https://mirror.invalid/f", tmp_path / "f", progress=False)


def test_unusable_url_is_a_fetch_error(tmp_path):
    with pytest.raises(FetchError, match="'cifar.tar.gz' is not a URL that can be downloaded"):
        download("cifar.tar.gz", tmp_path / "f", progress=False)


# --- safe_extract_tar -------------------------------------------------------------------------------------

@pytest.mark.parametrize("add_members, reason", [
    (lambda tar: add_file(tar, "../escape"), "'..'"),
    (lambda tar: add_file(tar, "ok/../../escape"), "'..'"),
    (lambda tar: add_file(tar, "/tmp/ptqflow-absolute-escape"), "absolute"),
    (lambda tar: add_special(tar, "link", tarfile.SYMTYPE, "../outside"), "link"),
    (lambda tar: add_special(tar, "hard", tarfile.LNKTYPE, "/etc/passwd"), "link"),
    (lambda tar: add_special(tar, "tty", tarfile.CHRTYPE), "device"),
    (lambda tar: add_special(tar, "pipe", tarfile.FIFOTYPE), "device"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "char-device", "fifo"])
def test_unsafe_archive_is_refused_before_anything_is_written(tmp_path, add_members, reason):
    def members(tar):
        add_file(tar, "first-harmless-file")  # must not be written either
        add_members(tar)

    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(members))
    with pytest.raises(FetchError, match=f"refusing to extract .*{reason}"):
        safe_extract_tar(archive, tmp_path / "dest")
    assert listing(tmp_path) == ["bad.tar.gz"]
    assert not Path("/tmp/ptqflow-absolute-escape").exists()


def test_safe_extract_tar_extracts_plain_archive(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(tar_gz(lambda tar: (add_file(tar, "top/a.txt", b"hello"), add_file(tar, "top/b/c", b""))))
    safe_extract_tar(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "top" / "a.txt").read_bytes() == b"hello"
    assert (tmp_path / "dest" / "top" / "b" / "c").is_file()


def test_corrupt_archive_is_a_fetch_error(tmp_path):
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(tar_gz(lambda tar: add_file(tar, "a", bytes(range(256)) * 400))[:300])
    with pytest.raises(FetchError, match="not a readable tar archive"):
        safe_extract_tar(archive, tmp_path / "dest")


# --- fetch_cifar10 ----------------------------------------------------------------------------------------

def test_fetch_cifar10_downloads_validates_and_is_idempotent(server, tmp_path, cifar_archive):
    server.files["/cifar.tar.gz"] = cifar_archive
    dest = tmp_path / "data"

    root = fetch_cifar10(dest, url=server.url("/cifar.tar.gz"), md5=md5_of(cifar_archive), progress=False)

    assert root == dest / CIFAR10_DIR_NAME
    assert len(load_cifar10(root).test) == 10
    assert (root / VERIFIED_MARKER).read_text().strip() == md5_of(cifar_archive)
    assert [p.name for p in dest.iterdir()] == [CIFAR10_DIR_NAME]  # no tarball, no staging directory
    assert len(server.requests) == 1

    assert fetch_cifar10(dest, url=server.url("/cifar.tar.gz"), md5=md5_of(cifar_archive), progress=False) == root
    assert len(server.requests) == 1


def test_fetch_cifar10_replaces_dataset_it_did_not_verify(server, tmp_path, cifar_archive):
    server.files["/cifar.tar.gz"] = cifar_archive
    broken = tmp_path / CIFAR10_DIR_NAME
    broken.mkdir()
    (broken / "test_batch").write_bytes(b"truncated")
    root = fetch_cifar10(tmp_path, url=server.url("/cifar.tar.gz"), md5=md5_of(cifar_archive), progress=False)
    assert len(load_cifar10(root).train) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [CIFAR10_DIR_NAME]


def test_fetch_cifar10_md5_mismatch_leaves_nothing(server, tmp_path, cifar_archive):
    server.files["/cifar.tar.gz"] = cifar_archive
    with pytest.raises(IntegrityError, match="MD5"):
        fetch_cifar10(tmp_path / "data", url=server.url("/cifar.tar.gz"), md5="0" * 32, progress=False)
    assert listing(tmp_path) == ["data"]


@pytest.mark.parametrize("add_members", [
    lambda tar: add_file(tar, f"{CIFAR10_DIR_NAME}/../../escape"),
    lambda tar: add_special(tar, f"{CIFAR10_DIR_NAME}/escape", tarfile.SYMTYPE, "/tmp"),
], ids=["dotdot", "symlink-outside"])
def test_fetch_cifar10_refuses_unsafe_archive(server, tmp_path, add_members):
    archive = tar_gz(add_members)
    server.files["/cifar.tar.gz"] = archive
    dest = tmp_path / "data"
    with pytest.raises(FetchError, match="refusing to extract"):
        fetch_cifar10(dest, url=server.url("/cifar.tar.gz"), md5=md5_of(archive), progress=False)
    assert listing(tmp_path) == ["data"]


def test_fetch_cifar10_refuses_archive_that_is_not_cifar(server, tmp_path):
    archive = tar_gz(lambda tar: add_file(tar, f"{CIFAR10_DIR_NAME}/batches.meta", b"not a pickle"))
    server.files["/cifar.tar.gz"] = archive
    with pytest.raises(DataError, match="is not CIFAR-10 python version: .* lacks data_batch_1"):
        fetch_cifar10(tmp_path, url=server.url("/cifar.tar.gz"), md5=md5_of(archive), progress=False)
    assert listing(tmp_path) == []


# --- fetch_resnet8 ----------------------------------------------------------------------------------------

def test_fetch_resnet8_converts_keeps_h5_and_is_idempotent(server, tmp_path):
    from ptqflow.models.graph.keras_resnet8 import recorded_source_sha256

    h5_bytes = write_resnet8_h5(tmp_path / "source.h5").read_bytes()
    server.files["/resnet.h5"] = h5_bytes
    sha256 = hashlib.sha256(h5_bytes).hexdigest()
    dest = tmp_path / "models"

    onnx_path = fetch_resnet8(dest, url=server.url("/resnet.h5"), sha256=sha256, progress=False)

    assert onnx_path == dest / RESNET8_ONNX_NAME
    assert recorded_source_sha256(onnx_path) == sha256
    assert (dest / RESNET8_H5_NAME).read_bytes() == h5_bytes
    assert sorted(p.name for p in dest.iterdir()) == sorted([RESNET8_H5_NAME, RESNET8_ONNX_NAME])
    modified = onnx_path.stat().st_mtime_ns

    assert fetch_resnet8(dest, url=server.url("/resnet.h5"), sha256=sha256, progress=False) == onnx_path
    assert len(server.requests) == 1
    assert onnx_path.stat().st_mtime_ns == modified


def test_fetch_resnet8_sha256_mismatch_leaves_nothing(server, tmp_path):
    server.files["/resnet.h5"] = write_resnet8_h5(tmp_path / "source.h5").read_bytes()
    with pytest.raises(IntegrityError, match="SHA256"):
        fetch_resnet8(tmp_path / "models", url=server.url("/resnet.h5"), sha256="0" * 64, progress=False)
    assert listing(tmp_path / "models") == []


def test_importing_fetch_loads_no_heavy_library():
    heavy = ["torch", "onnxruntime", "mlflow", "onnx", "h5py"]
    code = f"import sys, ptqflow.pipelines.data.fetch; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
