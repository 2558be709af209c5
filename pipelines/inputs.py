"""The default model and data paths: fetched on first use unless the user forbids it."""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import DataError, ModelError

DEFAULT_MODEL = Path("models/resnet8.onnx")
DEFAULT_DATA_DIR = Path("data/cifar-10-batches-py")


def ensure_model(path: Path, fetch: bool, url: str | None = None) -> Path:
    """`path` if it exists; the reference ResNet8 fetched into place when `path` is the default and may be fetched."""
    if path.exists() or path != DEFAULT_MODEL:
        return path
    if not fetch:
        raise ModelError(f"model file {path} not found: run `ptqflow fetch resnet8`, or pass --model")
    from pipelines import fetch as fetching

    return fetching.fetch_resnet8(path.parent, url=url or fetching.RESNET8_H5_URL)


def ensure_data(path: Path, fetch: bool, url: str | None = None, md5: str | None = None) -> Path:
    """`path` if it exists; CIFAR-10 fetched into place when `path` is the default and may be fetched."""
    if path.exists() or path != DEFAULT_DATA_DIR:
        return path
    if not fetch:
        raise DataError(f"data directory {path} not found: run `ptqflow fetch cifar10`, or pass --data-dir")
    from pipelines import fetch as fetching

    return fetching.fetch_cifar10(path.parent, url=url or fetching.CIFAR10_URL, md5=md5 or fetching.CIFAR10_MD5)
