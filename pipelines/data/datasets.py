"""Image-classification datasets in every format ptqflow reads, loaded into one layout.

Formats (`--data-format`; `auto` detects them from what `--data-dir` holds):

- `cifar10`: CIFAR-10 Python pickles (`batches.meta`, `data_batch_1..5`, `test_batch`); the class count is the
  number of `label_names` (10 for CIFAR-10 itself), so other 32x32 RGB datasets written this way load too;
- `cifar100`: CIFAR-100 Python pickles (`meta`, `train`, `test`): the fine labels and `fine_label_names`. Both
  pickle formats are read by ptqflow.pipelines.data.cifar's restricted unpickler, which never runs code from a file;
- `imagefolder`: `train/<class>/*.png|jpg|jpeg` and `test/<class>/...` (or `val/<class>/...` when there is no
  `test/`), decoded with Pillow. Class names are the sub-folders of `train/`, sorted by name. Greyscale images
  (`L`, `1`, `LA`) give 1 channel, colour ones 3: `RGBA`, `P` (palette), `CMYK` and `YCbCr` are converted to RGB
  (an alpha channel is dropped, not composited). Every image of the dataset must have the same size and channel
  count. Within a split, images are ordered by file name (digit runs compare as numbers), then by class, so files
  named after their index in another copy of the dataset keep its order, and with it the calibration set a seed
  selects. Other files (hidden ones, other extensions, sub-folders of a class folder) are ignored;
- `npz`: one `.npz` file (the `--data-dir` path itself, or the only `.npz` in that directory) holding `x_train`,
  `y_train`, `x_test`, `y_test` (images N x H x W x C, or N x H x W for one channel, or N x C x H x W when only
  that reading gives 1 or 3 channels; labels N or N x 1 integers) and optionally `class_names`; without them the
  classes are named `0`..`K-1`, K being the largest label plus one.
  Read with `allow_pickle=False`: an object array is refused, never unpickled.

Every format loads into a Dataset whose splits hold images as N x C x H x W (channel-first, the CIFAR files' own
order) with C 1 or 3, and labels as int64 in 0..K-1. Pixels are uint8 0..255, except from a float `.npz`, whose
values are kept as they are (float32): the preprocessing then treats them as pixel values, so `raw` passes them on
unchanged, `unit` divides them by 255 and `--mean`/`--std` apply to them as given. The dataset's digest is a SHA-256
over its files, so a changed image changes it.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError
from ptqflow.common.files import hash_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CHANNELS = (1, 3)
MAX_CLASSES = 100_000  # the most classes a file may declare (names in a meta file, the largest .npz label)
# Pillow modes as ptqflow reads them: greyscale ones become "L" (1 channel), colour ones "RGB" (3 channels).
_GREY_MODES = {"L", "1", "LA", "La"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
FORMAT_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


@dataclass(frozen=True)
class Split:
    """Images as N x C x H x W (uint8, or float32 from a float .npz) and labels as int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, limit: int | None) -> "Split":
        if limit is None or limit >= len(self):
            return self
        return Split(self.images[:limit], self.labels[:limit])


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    class_names: tuple[str, ...]
    digest: str  # SHA-256 over the dataset's files (see each format's reader for exactly what)
    root: Path  # what --data-dir named: a directory, or the .npz file
    format: str = "cifar10"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    @property
    def title(self) -> str:
        """How messages and descriptions name the dataset: CIFAR-10, CIFAR-100, or the folder or file name."""
        return FORMAT_TITLES.get(self.format) or self.root.stem or self.format

    @property
    def name(self) -> str:
        """The name of its MLflow datasets (`<name>-test`, `<name>-train`): `cifar10` for CIFAR-10."""
        if self.format in FORMAT_TITLES:
            return self.format
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.root.stem).strip("-")[:100] or self.format

    def describe(self) -> str:
        return f"{self.format} data at {self.root}"


def size_text(size: tuple[int, int]) -> str:
    """(height, width) as `HxW`."""
    return f"{size[0]}x{size[1]}"


# ---- detection ---------------------------------------------------------------------------------------------------
def detect_format(root: Path) -> str:
    """The format of what `root` holds; a DataError when it is none ptqflow reads."""
    from ptqflow.pipelines.data.cifar import ALL_FILES, CIFAR100_FILES

    if root.is_file():
        if root.suffix.lower() == ".npz":
            return "npz"
        raise DataError(f"{root} is a file but not an .npz archive; pass a dataset directory or an .npz file as "
                        "--data-dir")
    if not root.is_dir():
        raise DataError(f"data directory {root} not found: put cifar-10-batches-py there or pass --data-dir")
    if any((root / name).is_file() for name in ALL_FILES):
        return "cifar10"  # a missing or damaged batch is the CIFAR-10 reader's to name
    if any((root / name).is_file() for name in CIFAR100_FILES):
        return "cifar100"
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        return "imagefolder"
    if _npz_files(root):
        return "npz"
    raise DataError(f"{root} holds no dataset ptqflow reads: expected CIFAR-10 pickles (batches.meta, data_batch_1..5, "
                    "test_batch), CIFAR-100 pickles (meta, train, test), an image folder (train/<class>/ and "
                    "test/<class>/ or val/<class>/) or one .npz file (x_train, y_train, x_test, y_test); "
                    "pass --data-format to say which")


def load_dataset(root: Path | str, data_format: str = "auto") -> Dataset:
    """Load and check a dataset; any problem is a DataError with a one-line reason."""
    from ptqflow.pipelines.data import cifar

    root = Path(root)
    data_format = getattr(data_format, "value", data_format)  # a DataFormat choice or its value
    if data_format == "auto":
        data_format = detect_format(root)
    elif not root.exists():
        raise DataError(f"data directory {root} not found: put the dataset there or pass --data-dir")
    readers = {"cifar10": cifar.load_cifar10, "cifar100": cifar.load_cifar100, "imagefolder": load_image_folder,
               "npz": load_npz}
    if data_format not in readers:
        raise DataError(f"unknown data format '{data_format}'; choose from auto, {', '.join(readers)}")
    return readers[data_format](root)


def check_dataset(dataset: Dataset) -> Dataset:
    """What every format must satisfy: both splits non-empty, the same image shape, 1 or 3 channels, labels in
    0..K-1 and every class in both splits. Returns the dataset."""
    where, k = dataset.root, dataset.num_classes
    if k < 1:
        raise DataError(f"{where}: the dataset names no class")
    if len(set(dataset.class_names)) != k:
        twice = next(n for n in dataset.class_names if dataset.class_names.count(n) > 1)
        raise DataError(f"{where}: class name {twice!r} is given twice; class names must be unique")
    shapes = {}
    for split_name, split in (("training", dataset.train), ("test", dataset.test)):
        if len(split) == 0:
            raise DataError(f"{where}: the {split_name} set holds no image")
        if split.images.ndim != 4 or split.images.shape[0] != len(split):
            raise DataError(f"{where}: the {split_name} images are not one N x C x H x W array")
        shapes[split_name] = split.images.shape[1:]
        bad = (split.labels < 0) | (split.labels >= k)
        if bad.any():
            raise DataError(f"{where}: label {int(split.labels[bad][0])} of the {split_name} set is outside "
                            f"0..{k - 1} ({k} classes)")
        counts = np.bincount(split.labels, minlength=k)
        if (counts == 0).any():
            missing = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"{where}: the {split_name} set has no image of class {missing} "
                            f"({dataset.class_names[missing]})")
    if shapes["training"] != shapes["test"]:
        raise DataError(f"{where}: training images are {_shape_words(shapes['training'])} but test images are "
                        f"{_shape_words(shapes['test'])}; both splits must have one size and channel count")
    if shapes["training"][0] not in CHANNELS:
        raise DataError(f"{where}: images have {shapes['training'][0]} channels; ptqflow reads 1 (greyscale) or 3 "
                        "(RGB)")
    return dataset


def _shape_words(chw: tuple[int, ...]) -> str:
    c, h, w = chw
    return f"{h}x{w} with {c} channel{'s' if c != 1 else ''}"


# ---- image folders -----------------------------------------------------------------------------------------------
def _natural_key(name: str) -> tuple:
    """File names in natural order: digit runs compare as numbers ("img2" before "img10")."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def decode_image(raw: bytes, path: Path) -> np.ndarray:
    """One PNG or JPEG file as H x W x C uint8 (C 1 or 3); a DataError naming `path` for anything else."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is refused, not decoded
            with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as image:
                image.load()
                if image.mode in _GREY_MODES:
                    image = image.convert("L") if image.mode != "L" else image
                elif image.mode in _COLOUR_MODES:
                    image = image.convert("RGB") if image.mode != "RGB" else image
                else:
                    raise DataError(f"{path} is a {image.mode} image; ptqflow reads 8-bit greyscale or colour "
                                    "PNG/JPEG images")
                array = np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... depending on the damage
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"{path} is not a readable PNG or JPEG image ({type(exc).__name__}"
                        f"{': ' + first if first else ''})") from exc
    return array[:, :, None] if array.ndim == 2 else array


def _image_folder_splits(root: Path) -> tuple[Path, Path]:
    train = root / "train"
    test = root / "test" if (root / "test").is_dir() else root / "val"
    if not train.is_dir() or not test.is_dir():
        raise DataError(f"{root} is not an image folder: it needs train/<class>/ and test/<class>/ (or "
                        "val/<class>/) sub-folders of .png/.jpg images")
    return train, test


def load_image_folder(root: Path | str) -> Dataset:
    """`train/<class>/*.png|jpg|jpeg` and `test/` (or `val/`) alike; see the module docstring for the rules. The
    digest is a SHA-256 over each image file's path (relative to root) and SHA-256, in path order."""
    root = Path(root)
    train_dir, test_dir = _image_folder_splits(root)
    class_names = tuple(d.name for d in _visible_dirs(train_dir))
    if not class_names:
        raise DataError(f"{train_dir} has no class sub-folders; put each class's images in train/<class>/")
    file_digests: dict[str, str] = {}
    reference: list = []  # (shape, path) of the dataset's first image: every other image must match it
    splits = []
    for split_dir in (train_dir, test_dir):
        class_dirs = _visible_dirs(split_dir)
        unknown = [d.name for d in class_dirs if d.name not in class_names]
        if unknown:
            shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
            raise DataError(f"{split_dir / unknown[0]} is not a class of {train_dir} (its classes are the "
                            f"sub-folders there: {shown})")
        entries = []
        for class_dir in class_dirs:
            files = _image_files(class_dir)
            if not files and split_dir == train_dir:
                raise DataError(f"{class_dir} holds no .png or .jpg image")
            label = class_names.index(class_dir.name)
            entries += [(_natural_key(f.name), label, f) for f in files]
        if not entries:
            raise DataError(f"{split_dir} holds no .png or .jpg image in its class sub-folders")
        entries.sort(key=lambda e: (e[0], e[1]))
        images = []
        for _, _, path in entries:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror}") from exc
            file_digests[path.relative_to(root).as_posix()] = hashlib.sha256(raw).hexdigest()
            image = decode_image(raw, path)
            if not reference:
                reference[:] = [image.shape, path]
            elif image.shape != reference[0]:
                h, w, c = image.shape
                rh, rw, rc = reference[0]
                raise DataError(f"{path} is {w}x{h} (width x height) with {c} channel{'s' if c != 1 else ''}, but "
                                f"{reference[1]} is {rw}x{rh} with {rc}: every image must have the same size and "
                                "channel count (resize or convert them first)")
            images.append(image)
        stacked = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
        splits.append(Split(stacked, np.array([label for _, label, _ in entries], dtype=np.int64)))
    sha = hashlib.sha256()
    for relative in sorted(file_digests):
        sha.update(f"{relative}\0{file_digests[relative]}\n".encode())
    return check_dataset(Dataset(splits[0], splits[1], class_names, sha.hexdigest(), root, "imagefolder"))


# ---- .npz --------------------------------------------------------------------------------------------------------
def _npz_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".npz" and p.is_file())


def _npz_path(root: Path) -> Path:
    if root.is_file():
        return root
    found = _npz_files(root) if root.is_dir() else []
    if len(found) != 1:
        raise DataError(f"{root} holds {len(found)} .npz files; pass the one to use as --data-dir")
    return found[0]


def file_digest(paths: list[tuple[str, Path]]) -> str:
    """SHA-256 over each file's name and bytes, in the order given (how the CIFAR and .npz digests are made)."""
    sha = hashlib.sha256()
    for name, path in paths:
        sha.update(name.encode())
        try:
            hash_file(path, sha)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return sha.hexdigest()


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
    """An .npz archive (or the only one in a directory); see the module docstring. The digest is a SHA-256 over
    the file's name and bytes."""
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


# ---- resizing ----------------------------------------------------------------------------------------------------
def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x C x H x W images resized to `size` (height, width) with Pillow's bilinear filter (which also smooths when
    shrinking). uint8 images are resized as 8-bit greyscale or RGB images (rounded back to uint8, as an image tool
    would write them), float images channel by channel in float. Unchanged when they already have that size."""
    from PIL import Image

    n, c, h, w = images.shape
    if (h, w) == tuple(size):
        return images
    out = np.empty((n, c, *size), dtype=images.dtype)
    target = (int(size[1]), int(size[0]))  # Pillow takes (width, height)
    for i in range(n):
        if images.dtype == np.uint8:
            hwc = np.ascontiguousarray(images[i].transpose(1, 2, 0))
            resized = np.asarray(Image.fromarray(hwc[:, :, 0] if c == 1 else hwc).resize(target,
                                                                                         Image.Resampling.BILINEAR))
            out[i] = resized[None] if c == 1 else resized.transpose(2, 0, 1)
        else:
            for k in range(c):
                plane = Image.fromarray(np.ascontiguousarray(images[i, k], dtype=np.float32))
                out[i, k] = np.asarray(plane.resize(target, Image.Resampling.BILINEAR))
    return out
