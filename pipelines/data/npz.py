"""`.npz` datasets: one archive holding `x_train`, `y_train`, `x_test`, `y_test` (and optionally `class_names`), read
with `allow_pickle=False` (the rules are in ptqflow.pipelines.data.datasets' docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError
from ptqflow.pipelines.data.dataset import CHANNELS, MAX_CLASSES, Dataset, Split, check_dataset, file_digest

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".npz" and p.is_file())


def _npz_path(root: Path) -> Path:
    if root.is_file():
        return root
    found = npz_files(root) if root.is_dir() else []
    if len(found) != 1:
        raise DataError(f"{root} holds {len(found)} .npz files; pass the one to use as --data-dir")
    return found[0]


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise DataError(f"{path}: '{key}' holds pickled Python objects, which ptqflow never unpickles; save "
                            "plain numeric arrays (uint8 or float images, integer labels)") from exc
        raise DataError(f"{path}: '{key}' is not a readable array ({' '.join(str(exc).split())[:200]})") from exc
    except Exception as exc:  # zipfile, zlib and numpy raise many kinds for a damaged archive
        raise DataError(f"{path}: '{key}' cannot be read ({type(exc).__name__}); the file is damaged or "
                        "truncated") from exc


def _npz_images(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim == 4 and array.shape[-1] not in CHANNELS and array.shape[1] in CHANNELS:
        array = array.transpose(0, 2, 3, 1)  # N x C x H x W: unambiguous, so taken as such
    if array.ndim != 4 or array.shape[-1] not in CHANNELS:
        raise DataError(f"{path}: '{key}' must be images N x H x W x C (NHWC, C 1 or 3) or N x H x W, got shape "
                        f"{tuple(array.shape)}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise DataError(f"{path}: '{key}' holds NaN or infinite values")
    else:
        raise DataError(f"{path}: '{key}' is {array.dtype}; images must be uint8 (0..255) or float")
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def _npz_labels(array: np.ndarray, key: str, path: Path, count: int) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"{path}: '{key}' must be N integer labels (shape N or N x 1), got {array.dtype} "
                        f"{tuple(array.shape)}")
    if len(array) != count:
        raise DataError(f"{path}: '{key}' has {len(array)} labels for {count} images")
    if len(array) and (int(array.min()) < 0 or int(array.max()) >= MAX_CLASSES):
        bad = int(array.min()) if int(array.min()) < 0 else int(array.max())
        raise DataError(f"{path}: '{key}' holds label {bad}; labels are class indices 0..K-1 (K at most "
                        f"{MAX_CLASSES})")
    return array.astype(np.int64)


def load_npz(root: Path | str) -> Dataset:
    """An .npz archive (or the only one in a directory); see ptqflow.pipelines.data.datasets' docstring. The digest
    is a SHA-256 over the file's name and bytes."""
    import zipfile

    path = _npz_path(Path(root))
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path} is not an .npz archive of arrays ({' '.join(str(exc).split())[:200]})") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({type(exc).__name__})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with {', '.join(NPZ_KEYS)}")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: an .npz dataset holds {', '.join(NPZ_KEYS)}")
        splits = []
        for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
            images = _npz_images(_npz_array(archive, x_key, path), x_key, path)
            labels = _npz_labels(_npz_array(archive, y_key, path), y_key, path, len(images))
            splits.append(Split(images, labels))
        if "class_names" in archive.files:
            names = _npz_array(archive, "class_names", path)
            if names.ndim != 1 or names.dtype.kind not in "US" or not len(names):
                raise DataError(f"{path}: 'class_names' must be a 1-D array of strings")
            class_names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                                for n in names.tolist())
        else:
            top = max(int(s.labels.max()) for s in splits)
            class_names = tuple(str(c) for c in range(top + 1))
    if splits[0].images.dtype != splits[1].images.dtype:
        raise DataError(f"{path}: x_train is {splits[0].images.dtype} but x_test is {splits[1].images.dtype}; "
                        "both must have the same dtype")
    return check_dataset(Dataset(splits[0], splits[1], class_names, file_digest([(path.name, path)]), path, "npz"))
