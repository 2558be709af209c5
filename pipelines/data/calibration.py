"""The calibration set: a seeded, class-stratified subset of the training images.

Selection ranks each image by a keyed BLAKE2 hash of (seed, index) rather than a PRNG stream, so the same seed
gives the same indices on any machine and any numpy version.

Each of the K classes gets an equal share of the size asked for; when K does not divide it, the first (size mod K)
classes get one image more. A class with fewer training images than its share gives all it has, and the selection
says so (CalibrationSelection.note) instead of failing: the set is then smaller than asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ptqflow.common.errors import ConfigError


def _rank_key(seed: int | str, index: int) -> bytes:
    return hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=str(seed).encode()).digest()


@dataclass(frozen=True)
class Shortfall:
    """A class that had fewer training images than its share of the calibration set."""

    label: int
    wanted: int
    taken: int


@dataclass(frozen=True)
class CalibrationSelection:
    indices: np.ndarray  # training-set indices, sorted ascending
    size: int  # as asked for
    shortfalls: tuple[Shortfall, ...] = ()

    def note(self, class_names: tuple[str, ...] | None = None) -> str | None:
        """One line saying which classes gave fewer images than their share, or None when every class gave it."""
        if not self.shortfalls:
            return None

        def name(label: int) -> str:
            return f"'{class_names[label]}'" if class_names and label < len(class_names) else str(label)

        shown = ", ".join(f"{name(s.label)} {s.taken} of {s.wanted}" for s in self.shortfalls[:10])
        more = f" and {len(self.shortfalls) - 10} more" if len(self.shortfalls) > 10 else ""
        return (f"calibration took {len(self.indices)} images instead of {self.size}: "
                f"{len(self.shortfalls)} class{'es' if len(self.shortfalls) > 1 else ''} had fewer training images "
                f"than their share, so all of them were taken ({shown}{more})")


def class_shares(size: int, num_classes: int) -> list[int]:
    """How many images each class contributes to a calibration set of `size`."""
    if size <= 0:
        raise ConfigError(f"--calibration-size must be positive, got {size}")
    if size < num_classes:
        raise ConfigError(f"--calibration-size {size} is smaller than the {num_classes} classes, so the set cannot "
                          f"hold an image of each; pass at least {num_classes}")
    base, extra = divmod(size, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def stratified_selection(labels: np.ndarray, size: int, seed: int,
                         num_classes: int | None = None) -> CalibrationSelection:
    """Each class's share (class_shares) of training indices, chosen by keyed hash rank; a class with fewer images
    gives all of them. num_classes defaults to the largest label plus one."""
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 1
    chosen, shortfalls = [], []
    for c, share in enumerate(class_shares(size, num_classes)):
        members = np.flatnonzero(labels == c)
        if len(members) < share:
            shortfalls.append(Shortfall(c, share, len(members)))
        ranked = sorted(members.tolist(), key=lambda i: _rank_key(seed, i))
        chosen.extend(ranked[:share])
    return CalibrationSelection(np.array(sorted(chosen), dtype=np.int64), size, tuple(shortfalls))


def stratified_indices(labels: np.ndarray, size: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """stratified_selection's indices, sorted ascending."""
    return stratified_selection(labels, size, seed, num_classes).indices


def held_out_indices(labels: np.ndarray, exclude: np.ndarray, size: int, seed: int,
                     num_classes: int | None = None) -> np.ndarray:
    """Up to `size` training indices outside `exclude` (the calibration set), stratified by class with their own
    ranking key (so they are not simply the next images the calibration ranking would take); sorted ascending. Fewer
    when fewer are left; none for size 0."""
    labels = np.asarray(labels)
    mask = np.ones(len(labels), dtype=bool)
    mask[np.asarray(exclude, dtype=np.int64)] = False
    rest = np.flatnonzero(mask)
    size = min(size, len(rest))
    if size <= 0:
        return np.array([], dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 1
    key = f"held-out:{seed}"  # _rank_key reads the seed as text
    if size < num_classes:  # too few for a share of every class: the first `size` by rank
        return np.sort(np.array(sorted(rest.tolist(), key=lambda i: _rank_key(key, i))[:size], dtype=np.int64))
    return rest[stratified_selection(labels[rest], size, key, num_classes).indices]


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()
