"""Read CIFAR-10 in the official `cifar-10-batches-py` layout, safely.

The official files are Python 2 pickles. Pickle can run arbitrary code, so batches are read with a restricted
unpickler that admits only what these files contain (builtin containers, strings, numbers and numpy's array
reconstruction); anything else is refused before it is called.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.files import hash_file

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
ALL_FILES = (META_FILE, *TRAIN_BATCHES, TEST_BATCH)
NUM_CLASSES = 10
IMAGE_SHAPE_CHW = (3, 32, 32)
IMAGE_VALUES = 3 * 32 * 32
DEFAULT_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# (module, name) pairs a CIFAR batch may reference; numpy moved `multiarray` under `_core` in 2.0.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        if module in ("__builtin__", "builtins"):
            return _bytearray_of_data
        if module == "_codecs":
            return _latin1_encode
        if name == "_reconstruct":
            return _reconstruct_empty
        return super().find_class(module, name)


def _bytearray_of_data(source=b"", *args):
    """`bytearray` as pickles of bytearrays use it (from bytes or a latin-1 str); `bytearray(n)` would let a few
    bytes of pickle allocate gigabytes, so sizes are refused."""
    if not isinstance(source, (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"bytearray({type(source).__name__}) is not allowed in a CIFAR-10 batch")
    return bytearray(source, *args)


def _reconstruct_empty(subtype, shape, dtype):
    """numpy's `_reconstruct` as ndarray pickles call it: an empty ndarray that BUILD then fills from the file's own
    bytes. Any other shape would allocate memory the file does not hold, so only (0,) is accepted."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    if subtype is not np.ndarray or not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for an empty ndarray in a CIFAR-10 batch")
    return _reconstruct(subtype, shape, dtype)


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it; any codec but latin-1 is refused, so a batch cannot
    reach other codecs (an unknown name would also escape as LookupError)."""
    import codecs

    if not isinstance(obj, str) or not isinstance(encoding, str) or errors != "strict" \
            or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(obj).__name__} and codec "
                                     f"{str(encoding)[:40]!r} is not allowed in a CIFAR-10 batch")
    return codecs.encode(obj, "latin1")


def safe_unpickle(path: Path) -> dict:
    """Load one pickle file admitting only CIFAR-10's contents; keys are returned as str."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:200]  # some pickle messages span two lines; the CLI shows one
        raise DataError(f"{path} is not a valid CIFAR-10 batch: {reason}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, LookupError,
            MemoryError, OverflowError, RecursionError) as exc:  # LookupError covers KeyError and IndexError
        raise DataError(f"{path} is truncated or not a CIFAR-10 batch ({type(exc).__name__}); "
                        "re-download the dataset") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict as CIFAR-10 batches do")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


@dataclass(frozen=True)
class Split:
    """Images as N x 3 x 32 x 32 uint8 (the files' own channel-first order) and labels as int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, limit: int | None) -> "Split":
        if limit is None or limit >= len(self):
            return self
        return Split(self.images[:limit], self.labels[:limit])


@dataclass(frozen=True)
class Cifar10:
    train: Split
    test: Split
    class_names: tuple[str, ...]
    digest: str  # SHA-256 over every file's bytes, in a fixed order
    root: Path


def _read_batch(path: Path) -> Split:
    batch = safe_unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path} has no '{key}' entry; it is not a CIFAR-10 batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be an N x {IMAGE_VALUES} uint8 array, got {shape} {dtype}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                        f"for {data.shape[0]} images")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise DataError(f"{path}: label {int(labels[bad][0])} is outside 0..{NUM_CLASSES - 1}")
    return Split(data.reshape(-1, *IMAGE_SHAPE_CHW), labels)


def _class_names(path: Path) -> tuple[str, ...]:
    meta = safe_unpickle(path)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES \
            or not all(isinstance(n, (bytes, str)) and 0 < len(n) <= 100 for n in names):
        raise DataError(f"{path}: 'label_names' must list {NUM_CLASSES} class names (1 to 100 characters each)")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def dataset_digest(root: Path) -> str:
    """SHA-256 over all files of the dataset (names and bytes), so any changed image changes it."""
    sha = hashlib.sha256()
    for name in ALL_FILES:
        sha.update(name.encode())
        hash_file(root / name, sha)
    return sha.hexdigest()


def check_layout(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data directory {root} not found: put cifar-10-batches-py there or pass --data-dir")
    missing = [name for name in ALL_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: it must hold the official cifar-10-batches-py "
                        "files (pass --data-dir to point elsewhere)")


def load_cifar10(root: Path | str) -> Cifar10:
    """Load and validate all batches. Raises DataError with a one-line reason on anything unexpected."""
    root = Path(root)
    check_layout(root)
    class_names = _class_names(root / META_FILE)
    train_parts = [_read_batch(root / name) for name in TRAIN_BATCHES]
    train = Split(np.concatenate([p.images for p in train_parts]), np.concatenate([p.labels for p in train_parts]))
    test = _read_batch(root / TEST_BATCH)
    for split_name, split in (("training", train), ("test", test)):
        counts = np.bincount(split.labels, minlength=NUM_CLASSES)
        if (counts == 0).any():
            raise DataError(f"{root}: the {split_name} set has no image of class "
                            f"{int(np.flatnonzero(counts == 0)[0])}")
    return Cifar10(train=train, test=test, class_names=class_names, digest=dataset_digest(root), root=root)
