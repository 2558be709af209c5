"""Atomic file writes and file digests, the same everywhere a model, a config or a download is written or checked."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK_BYTES = 1 << 20  # files are hashed 1 MiB at a time: a model or an archive never has to fit in memory


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path` and rename, so a failure never leaves a partial file in its place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def hash_file(path: Path | str, digest):
    """Feed the file's bytes into `digest` (a hashlib object) chunk by chunk and return it, so several files (or a
    name before each) can go into one digest."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest


def file_sha256(path: Path | str) -> str:
    """The file's SHA-256 as 64 hex digits."""
    return hash_file(path, hashlib.sha256()).hexdigest()


def update_with_tensors(digest, named_tensors) -> None:
    """Feed (name, torch tensor) pairs to a hashlib `digest`: each name, dtype, shape and raw bytes, so the same
    values under another name, type or shape differ."""
    import torch  # here: importing ptqflow.common stays free of torch

    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def array_sha256(array) -> str:
    """SHA-256 of a numpy array's dtype, shape and bytes (C order): the same values in another layout or type
    differ."""
    import numpy as np  # here: importing ptqflow.common stays free of numpy

    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
