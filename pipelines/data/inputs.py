"""The default model and data paths: fetched on first use unless the user forbids it."""

from __future__ import annotations

from pathlib import Path

from ptqflow.common.errors import DataError, ModelError

# Both under data/, a folder of the working directory that holds no source code (models/ is the package's own code).
DEFAULT_MODELS_DIR = Path("data/models")
DEFAULT_MODEL = DEFAULT_MODELS_DIR / "resnet8.onnx"
DEFAULT_DATA_DIR = Path("data/cifar-10-batches-py")

# How a failed fetch of a default path ends its message, in options every command that fetches them has (sweep,
# baseline, quantize pytorch/ort, tune); `ptqflow fetch` names its own (ptqflow.pipelines.data.fetch).
MODEL_UNREACHABLE_HINT = "pass --resnet8-url for a mirror, or --model for a local file"
MODEL_MISMATCH_HINT = "retry, or pass --model for a local file"
DATA_UNREACHABLE_HINT = "pass --cifar10-url for a mirror, or --data-dir for a local copy"
DATA_MISMATCH_HINT = "retry, pass --cifar10-md5 with a mirror's own MD5, or --data-dir for a local copy"


def ensure_model(path: Path, fetch: bool, url: str | None = None) -> Path:
    """`path` if it exists; the reference ResNet8 fetched into place when `path` is the default and may be fetched."""
    if path.exists() or path != DEFAULT_MODEL:
        return path
    if not fetch:
        raise ModelError(f"model file {path} not found: run `ptqflow fetch resnet8`, or pass --model")
    from ptqflow.pipelines.data import fetch as fetching

    return fetching.fetch_resnet8(path.parent, url=url or fetching.RESNET8_H5_URL,
                                  hints=fetching.FetchHints(MODEL_UNREACHABLE_HINT, MODEL_MISMATCH_HINT))


def ensure_data(path: Path, fetch: bool, url: str | None = None, md5: str | None = None) -> Path:
    """`path` if it exists; CIFAR-10 fetched into place when `path` is the default and may be fetched."""
    if path.exists() or path != DEFAULT_DATA_DIR:
        return path
    if not fetch:
        raise DataError(f"data directory {path} not found: run `ptqflow fetch cifar10`, or pass --data-dir")
    from ptqflow.pipelines.data import fetch as fetching

    return fetching.fetch_cifar10(path.parent, url=url or fetching.CIFAR10_URL, md5=md5 or fetching.CIFAR10_MD5,
                                  hints=fetching.FetchHints(DATA_UNREACHABLE_HINT, DATA_MISMATCH_HINT))
