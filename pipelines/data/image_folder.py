"""Image-folder datasets: `train/<class>/*.png|jpg|jpeg` and `test/<class>/...` (or `val/<class>/...`), decoded with
Pillow (the rules are in ptqflow.pipelines.data.datasets' docstring)."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError, first_line
from ptqflow.pipelines.data.dataset import Dataset, Split, check_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Pillow modes as ptqflow reads them: greyscale ones become "L" (1 channel), colour ones "RGB" (3 channels).
_GREY_MODES = {"L", "1", "LA", "La"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


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
        first = first_line(str(exc), 200)
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
    """`train/<class>/*.png|jpg|jpeg` and `test/` (or `val/`) alike; see ptqflow.pipelines.data.datasets' docstring
    for the rules. The digest is a SHA-256 over each image file's path (relative to root) and SHA-256, in path
    order."""
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
