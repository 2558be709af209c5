"""The calibration set: a seeded, class-stratified subset of the training images.

Selection ranks each image by a keyed BLAKE2 hash of (seed, index) rather than a PRNG stream, so the same seed
gives the same indices on any machine and any numpy version.
"""

from __future__ import annotations

import hashlib

import numpy as np

from common.errors import ConfigError


def _rank_key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=str(seed).encode()).digest()


def stratified_indices(labels: np.ndarray, size: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """size // num_classes training indices of each class, sorted ascending."""
    if size <= 0 or size % num_classes:
        raise ConfigError(f"--calibration-size must be a positive multiple of {num_classes} "
                          f"(stratified by class), got {size}")
    per_class = size // num_classes
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ConfigError(f"--calibration-size {size} needs {per_class} training images of class {c}, "
                              f"the data has {len(members)}; pass a smaller --calibration-size")
        ranked = sorted(members.tolist(), key=lambda i: _rank_key(seed, i))
        chosen.extend(ranked[:per_class])
    return np.array(sorted(chosen), dtype=np.int64)


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()
