"""The dataset every format loads into (`Dataset`, its `Split`s) and what every format must satisfy
(`check_dataset`): both splits non-empty, one image shape, 1 or 3 channels, labels 0..K-1."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqflow.common.errors import DataError
from ptqflow.common.files import hash_file

CHANNELS = (1, 3)
MAX_CLASSES = 100_000  # the most classes a file may declare (names in a meta file, the largest .npz label)
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
