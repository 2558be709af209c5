"""Signal-to-quantization-noise ratio accumulated batch by batch: 10 log10(signal energy / noise energy) over all
images, in float64, so memory stays bounded."""

from __future__ import annotations

import math

import numpy as np


def flat64(x) -> np.ndarray:
    """`x` as a flat float64 array (no copy when it is one already)."""
    return np.asarray(x, dtype=np.float64).reshape(-1)


def energy(flat: np.ndarray) -> float:
    """Sum of squares of a flat float64 array, accumulated in float64, in one pass. (einsum, not np.dot: BLAS's
    threads would contend with onnxruntime's for the cores.)"""
    return float(np.einsum("i,i->", flat, flat))


class Power:
    """Signal and noise energy of one comparison, summed over batches: SQNR over all images at the end."""

    __slots__ = ("signal", "noise", "seen")

    def __init__(self):
        self.signal = self.noise = 0.0
        self.seen = False

    def add(self, reference: np.ndarray, other: np.ndarray, signal: float | None = None) -> None:
        """Add one batch; `signal`: `energy(flat64(reference))` when the caller has it (a reference compared twice,
        passed as its `flat64`, which is then not converted again)."""
        reference = flat64(reference)
        # float64 difference of the float32 values (no float64 copy of `other`); its size must match
        difference = reference - np.asarray(other).reshape(reference.shape)
        self.signal += energy(reference) if signal is None else signal
        self.noise += energy(difference)
        self.seen = True

    def db(self) -> float | None:
        if not self.seen:
            return None
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)
