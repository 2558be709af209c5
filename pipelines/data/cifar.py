"""Read CIFAR-10 and CIFAR-100 in their official Python layouts (`cifar-10-batches-py`, `cifar-100-python`), safely.

The official files are Python 2 pickles. Pickle can run arbitrary code, so batches are read with a restricted
unpickler that admits only what these files contain (builtin containers, strings, numbers and numpy's array
reconstruction); anything else is refused before it is called. Both load into a
ptqflow.pipelines.data.dataset.Dataset (images N x 3 x 32 x 32 uint8, the files' own channel-first order).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError
from ptqflow.pipelines.data.dataset import MAX_CLASSES, Dataset, Split, check_dataset, file_digest

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
ALL_FILES = (META_FILE, *TRAIN_BATCHES, TEST_BATCH)
NUM_CLASSES = 10  # of CIFAR-10 itself; the class count is read from the meta file
IMAGE_SHAPE_CHW = (3, 32, 32)  # both CIFAR pickle formats store 32x32 RGB images
IMAGE_VALUES = 3 * 32 * 32
DEFAULT_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# CIFAR-100 (`cifar-100-python`): one training and one test file, 100 fine classes (and 20 coarse ones, unused).
CIFAR100_META = "meta"
CIFAR100_TRAIN = "train"
CIFAR100_TEST = "test"
CIFAR100_FILES = (CIFAR100_META, CIFAR100_TRAIN, CIFAR100_TEST)
CIFAR100_CLASSES = 100  # of CIFAR-100 itself

Cifar10 = Dataset  # what load_cifar10 returned before other formats: the same fields

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
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")
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
        raise pickle.UnpicklingError(f"bytearray({type(source).__name__}) is not allowed in a CIFAR batch")
    return bytearray(source, *args)


def _reconstruct_empty(subtype, shape, dtype):
    """numpy's `_reconstruct` as ndarray pickles call it: an empty ndarray that BUILD then fills from the file's own
    bytes. Any other shape would allocate memory the file does not hold, so only (0,) is accepted."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    if subtype is not np.ndarray or not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for an empty ndarray in a CIFAR batch")
    return _reconstruct(subtype, shape, dtype)


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it; any codec but latin-1 is refused, so a batch cannot
    reach other codecs (an unknown name would also escape as LookupError)."""
    import codecs

    if not isinstance(obj, str) or not isinstance(encoding, str) or errors != "strict" \
            or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(obj).__name__} and codec "
                                     f"{str(encoding)[:40]!r} is not allowed in a CIFAR batch")
    return codecs.encode(obj, "latin1")


def safe_unpickle(path: Path, kind: str = "CIFAR-10") -> dict:
    """Load one pickle file admitting only CIFAR's contents; keys are returned as str. `kind` names the format in
    messages."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:200]  # some pickle messages span two lines; the CLI shows one
        raise DataError(f"{path} is not a valid {kind} batch: {reason}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, LookupError,
            MemoryError, OverflowError, RecursionError) as exc:  # LookupError covers KeyError and IndexError
        raise DataError(f"{path} is truncated or not a {kind} batch ({type(exc).__name__}); "
                        "re-download the dataset") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict as {kind} batches do")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str = "labels", num_classes: int = NUM_CLASSES,
                kind: str = "CIFAR-10") -> Split:
    batch = safe_unpickle(path, kind)
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(f"{path} has no '{key}' entry; it is not a {kind} batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be an N x {IMAGE_VALUES} uint8 array, got {shape} {dtype}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: '{label_key}' is not a list of integers") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                        f"for {data.shape[0]} images")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(f"{path}: label {int(labels[bad][0])} is outside 0..{num_classes - 1}")
    return Split(data.reshape(-1, *IMAGE_SHAPE_CHW), labels)


def _class_names(path: Path, key: str = "label_names", kind: str = "CIFAR-10") -> tuple[str, ...]:
    """The class names a meta file lists: their count is the dataset's class count (10 for CIFAR-10 itself, but a
    dataset written in the same format may have others)."""
    meta = safe_unpickle(path, kind)
    names = meta.get(key)
    if not isinstance(names, list) or not 0 < len(names) <= MAX_CLASSES \
            or not all(isinstance(n, (bytes, str)) and 0 < len(n) <= 100 for n in names):
        raise DataError(f"{path}: '{key}' must list the class names (1 to {MAX_CLASSES} names of 1 to 100 "
                        "characters each)")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def dataset_digest(root: Path) -> str:
    """SHA-256 over all files of the dataset (names and bytes), so any changed image changes it."""
    return file_digest([(name, root / name) for name in ALL_FILES])


def check_layout(root: Path, files: tuple[str, ...] = ALL_FILES, layout: str = "cifar-10-batches-py") -> None:
    if not root.is_dir():
        raise DataError(f"data directory {root} not found: put {layout} there or pass --data-dir")
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: it must hold the official {layout} "
                        "files (pass --data-dir to point elsewhere)")


def load_cifar10(root: Path | str) -> Dataset:
    """Load and validate all batches. Raises DataError with a one-line reason on anything unexpected."""
    root = Path(root)
    check_layout(root)
    class_names = _class_names(root / META_FILE)
    train_parts = [_read_batch(root / name, num_classes=len(class_names)) for name in TRAIN_BATCHES]
    train = Split(np.concatenate([p.images for p in train_parts]), np.concatenate([p.labels for p in train_parts]))
    test = _read_batch(root / TEST_BATCH, num_classes=len(class_names))
    return check_dataset(Dataset(train=train, test=test, class_names=class_names, digest=dataset_digest(root),
                                 root=root, format="cifar10"))


def load_cifar100(root: Path | str) -> Dataset:
    """CIFAR-100 in the official `cifar-100-python` layout: `meta` (fine_label_names), `train` and `test` (data,
    fine_labels), read like CIFAR-10. The digest covers meta, train and test (names and bytes)."""
    root = Path(root)
    kind = "CIFAR-100"
    check_layout(root, CIFAR100_FILES, "cifar-100-python")
    class_names = _class_names(root / CIFAR100_META, "fine_label_names", kind)
    train, test = (_read_batch(root / name, "fine_labels", len(class_names), kind)
                   for name in (CIFAR100_TRAIN, CIFAR100_TEST))
    digest = file_digest([(name, root / name) for name in CIFAR100_FILES])
    return check_dataset(Dataset(train=train, test=test, class_names=class_names, digest=digest, root=root,
                                 format="cifar100"))
