"""Download CIFAR-10 and the MLPerf Tiny ResNet8, verify them, and move them into place only when complete.

Only the standard library touches the network (urllib), so the tests can serve files from a local http.server.
torch, onnxruntime and mlflow are never imported here, because the CLI imports this module just to show --help.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ptqflow.common.errors import DataError, FetchError, IntegrityError
from ptqflow.common.files import hash_file
from ptqflow.pipelines.data.cifar import ALL_FILES, check_layout, load_cifar10
from ptqflow.pipelines.shared.progress import progress_task

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
RESNET8_COMMIT = "1bbcf37fac1b0c4be0bada2d7ddfb1e0bb4cb6a0"
RESNET8_H5_URL = (f"https://raw.githubusercontent.com/mlcommons/tiny/{RESNET8_COMMIT}"
                  "/benchmark/training/image_classification/trained_models/pretrainedResnet.h5")
RESNET8_H5_SHA256 = "5f938a8eea605438cc7360aa13c987bc6d7bd0c8d931b2917361ae7ae4eeda2f"

CIFAR10_DIR_NAME = "cifar-10-batches-py"
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
# Written last into a dataset dir that was extracted and validated here; holds the archive's MD5.
VERIFIED_MARKER = ".ptqflow-verified"
RESNET8_H5_NAME = "mlperf_tiny_pretrainedResnet.h5"
RESNET8_ONNX_NAME = "resnet8.onnx"

# Applies to connecting and to every read, so a stalled server fails the command instead of hanging it.
TIMEOUT_SECONDS = 30
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class FetchHints:
    """How a failed download's message ends: what to do, in the options of the command that fetched (`ptqflow
    fetch` has --url; the sweep-like commands pass their own, see ptqflow.pipelines.data.inputs)."""

    unreachable: str  # the server cannot be reached or refuses the file
    mismatch: str  # the file has another digest than expected


CIFAR10_FETCH_HINTS = FetchHints(unreachable="pass --url for a mirror", mismatch="retry, or pass the right --md5")
RESNET8_FETCH_HINTS = FetchHints(unreachable="pass --url for a mirror", mismatch="retry, or pass the right --sha256")


def _file_digest(path: Path, algorithm: str) -> str:
    return hash_file(path, hashlib.new(algorithm)).hexdigest()


def _is_file_with_digest(path: Path, algorithm: str, expected: str | None) -> bool:
    """True if path is a file and, when a digest is given, has it."""
    return path.is_file() and (expected is None or _file_digest(path, algorithm) == expected.lower())


def _describe(exc: BaseException) -> str:
    """A short reason: 'Connection refused' rather than '[Errno 111] Connection refused'."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _open(url: str, offset: int, hints: FetchHints) -> http.client.HTTPResponse:
    """GET url, asking for the bytes from offset on when offset > 0."""
    headers = {"User-Agent": "ptqflow"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the partial file is not shorter than the remote one: start over
            return _open(url, 0, hints)
        raise FetchError(f"{url} answered HTTP {exc.code} {exc.reason}; {hints.unreachable}") from exc
    except (OSError, http.client.HTTPException) as exc:
        # URLError (an OSError) covers connection refused, DNS failure and connect timeouts; a server that hangs
        # up or stalls before answering raises a bare OSError or HTTPException.
        raise FetchError(f"could not reach {url} ({_describe(exc)}); {hints.unreachable}") from exc
    except ValueError as exc:
        raise FetchError(f"{url!r} is not a URL that can be downloaded ({exc})") from exc


def _content_range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte of a 206 answer, from 'Content-Range: bytes START-END/TOTAL'."""
    unit, _, byte_range = (response.headers.get("Content-Range") or "").partition(" ")
    start = byte_range.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _verify(part: Path, url: str, md5: str | None, sha256: str | None, hints: FetchHints) -> None:
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = _file_digest(part, algorithm)
        if actual != expected.lower():
            part.unlink()
            raise IntegrityError(f"the file from {url} has {algorithm.upper()} {actual}, expected {expected}: "
                                 f"it is corrupt or a different file; {hints.mismatch}")


def _append_body(response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, url: str, *,
                 label: str, progress: bool) -> int:
    """Write the response body to part from offset on (truncating it if offset is 0); return part's new size."""
    received = offset
    # On stderr (stdout stays clean for piping): a bar on a terminal, plain lines in a log (ptqflow.pipelines.shared.progress).
    with open(part, "ab" if offset else "wb") as out, \
            progress_task(label, total, unit="bytes", completed=offset, show=progress) as advance:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError(f"download of {url} stopped after {received} bytes ({_describe(exc)}); "
                                 "run the command again to resume") from exc
            if not chunk:
                return received
            out.write(chunk)
            received += len(chunk)
            advance(len(chunk))  # a safe point to stop: the .part file is kept and the next run resumes from it


def download(url: str, target: Path, *, md5: str | None = None, sha256: str | None = None,
             progress: bool = True, hints: FetchHints | None = None) -> Path:
    """Download url to target, resuming an earlier partial download, and return target.

    Bytes go to `<target>.part`, which becomes target only once complete and matching the given digests. An
    interrupted download keeps the .part (the next call resumes it with a Range request); a digest mismatch
    deletes it. `hints` end the error messages (default: those of `ptqflow fetch`).
    """
    hints = hints or (RESNET8_FETCH_HINTS if sha256 and not md5 else CIFAR10_FETCH_HINTS)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    with _open(url, offset, hints) as response:
        if response.status == 206:
            if _content_range_start(response) != offset:
                part.unlink()
                raise FetchError(f"{url} answered a resume request with the wrong byte range; run the command "
                                 "again to download from the start")
        else:  # the server sent the whole file
            offset = 0
        length = response.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else None
        received = _append_body(response, part, offset, total, url, label=target.name, progress=progress)
    # http.client reports a connection closed early as a normal end of data, so compare with Content-Length.
    if total is not None and received < total:
        raise FetchError(f"download of {url} stopped after {received} of {total} bytes (connection closed); "
                         "run the command again to resume")
    _verify(part, url, md5, sha256, hints)
    os.replace(part, target)
    return target


def _unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "is an absolute path"
    if ".." in path.parts:
        return "climbs out of the destination with '..'"
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "is a device or other special file"
    return None


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a tar archive (any compression) into dest, refusing the whole archive before writing anything if
    a member is absolute, climbs out with '..', is a link or is a special file."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_member_reason(member)
                if reason:
                    raise FetchError(f"refusing to extract {archive}: member {member.name!r} {reason}")
            dest.mkdir(parents=True, exist_ok=True)
            # The "data" filter repeats these checks inside tarfile and also drops set-uid and owner bits.
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        # tarfile's "could not be opened" message spans several lines; the CLI shows one.
        raise FetchError(f"{archive} is not a readable tar archive ({_one_line(exc)}); "
                         "delete it and fetch again") from exc
    except OSError as exc:  # a damaged bz2 stream, or a member the file system refuses (name too long, ...)
        raise FetchError(f"cannot extract {archive} into {dest} ({_one_line(exc)}); "
                         "delete the archive and fetch again") from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_fetched_dataset(root: Path, md5: str | None) -> bool:
    marker = root / VERIFIED_MARKER
    if not marker.is_file() or (md5 is not None and marker.read_text().strip() != md5.lower()):
        return False
    try:
        check_layout(root)
    except DataError:
        return False
    return True


def fetch_cifar10(dest: Path = Path("data"), url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                  progress: bool = True, hints: FetchHints = CIFAR10_FETCH_HINTS) -> Path:
    """Make sure dest/cifar-10-batches-py holds CIFAR-10 (python version) and return that directory.

    A directory this function completed before (marker file with the archive's MD5, all files present) is
    reused without any network access. Otherwise the archive is downloaded, extracted into a temporary
    directory inside dest, validated with load_cifar10 and only then renamed into place, replacing whatever was
    there; a failure leaves no partial dataset behind.
    """
    dest = Path(dest)
    root = dest / CIFAR10_DIR_NAME
    if _is_fetched_dataset(root, md5):
        return root
    archive = dest / CIFAR10_ARCHIVE_NAME
    if not _is_file_with_digest(archive, "md5", md5):
        download(url, archive, md5=md5, progress=progress, hints=hints)
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=dest))
    try:
        safe_extract_tar(archive, staging)
        extracted = staging / CIFAR10_DIR_NAME
        missing = [name for name in ALL_FILES if not (extracted / name).is_file()]
        if missing:  # said here: load_cifar10's message would name the temp dir and --data-dir
            raise DataError(f"the archive from {url} is not CIFAR-10 python version: its {CIFAR10_DIR_NAME} lacks "
                            f"{', '.join(missing)}")
        try:
            load_cifar10(extracted)
        except DataError as exc:
            raise DataError(f"the archive from {url} is not CIFAR-10 python version: {exc}") from exc
        (extracted / VERIFIED_MARKER).write_text((md5 or _file_digest(archive, "md5")).lower() + "\n")
        if root.exists():
            root.rename(staging / "replaced")
        extracted.rename(root)
    except (FetchError, DataError):
        archive.unlink()  # its content is unusable, so fetching again must download it again
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return root


def fetch_resnet8(dest: Path = Path("data/models"), url: str = RESNET8_H5_URL, sha256: str | None = RESNET8_H5_SHA256,
                  progress: bool = True, hints: FetchHints = RESNET8_FETCH_HINTS) -> Path:
    """Make sure dest/resnet8.onnx is the MLPerf Tiny ResNet8 converted from its Keras file, and return it.

    The Keras file is kept as dest/mlperf_tiny_pretrainedResnet.h5. An ONNX file whose recorded source SHA-256
    equals sha256 is reused without any network access.
    """
    # h5py and onnx load only when a model is actually fetched.
    from ptqflow.models.graph.keras_resnet8 import convert_h5_to_onnx, recorded_source_sha256

    dest = Path(dest)
    h5_path, onnx_path = dest / RESNET8_H5_NAME, dest / RESNET8_ONNX_NAME
    if sha256 and onnx_path.is_file() and recorded_source_sha256(onnx_path) == sha256.lower():
        return onnx_path
    if not _is_file_with_digest(h5_path, "sha256", sha256):
        download(url, h5_path, sha256=sha256, progress=progress, hints=hints)
    return convert_h5_to_onnx(h5_path, onnx_path)
