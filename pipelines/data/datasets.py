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

from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError
from ptqflow.pipelines.data.cifar import ALL_FILES, CIFAR100_FILES, load_cifar10, load_cifar100
from ptqflow.pipelines.data.dataset import Dataset
from ptqflow.pipelines.data.image_folder import load_image_folder
from ptqflow.pipelines.data.npz import load_npz, npz_files


# ---- detection ---------------------------------------------------------------------------------------------------
def detect_format(root: Path) -> str:
    """The format of what `root` holds; a DataError when it is none ptqflow reads."""
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
    if npz_files(root):
        return "npz"
    raise DataError(f"{root} holds no dataset ptqflow reads: expected CIFAR-10 pickles (batches.meta, data_batch_1..5, "
                    "test_batch), CIFAR-100 pickles (meta, train, test), an image folder (train/<class>/ and "
                    "test/<class>/ or val/<class>/) or one .npz file (x_train, y_train, x_test, y_test); "
                    "pass --data-format to say which")


def load_dataset(root: Path | str, data_format: str = "auto") -> Dataset:
    """Load and check a dataset; any problem is a DataError with a one-line reason."""
    root = Path(root)
    data_format = getattr(data_format, "value", data_format)  # a DataFormat choice or its value
    if data_format == "auto":
        data_format = detect_format(root)
    elif not root.exists():
        raise DataError(f"data directory {root} not found: put the dataset there or pass --data-dir")
    readers = {"cifar10": load_cifar10, "cifar100": load_cifar100, "imagefolder": load_image_folder,
               "npz": load_npz}
    if data_format not in readers:
        raise DataError(f"unknown data format '{data_format}'; choose from auto, {', '.join(readers)}")
    return readers[data_format](root)


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
