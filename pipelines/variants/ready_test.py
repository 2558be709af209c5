"""The test images as every model of a sweep is fed them: made model-ready once, for all the models, when they fit
in memory; otherwise batch by batch, for each model. The transform works image by image, so the values are the
same either way."""

from __future__ import annotations

from typing import Callable

import numpy as np

# CIFAR-10's 10,000 test images take 123 MB as float32; a larger test set is made ready batch by batch.
READY_TEST_BYTES = 512 * 2**20


class ReadyTestImages:
    """`images` (as loaded) and the `transform` that makes a batch of them model-ready."""

    def __init__(self, images: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]):
        self.images = images
        self.transform = transform
        self._ready: np.ndarray | None = None

    @property
    def kept_ready(self) -> bool:
        """Whether the whole test set is held model-ready."""
        return self._ready is not None

    def batches_source(self) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """(images, what makes a batch of them model-ready): the ready set and the identity when it fits in
        READY_TEST_BYTES, else the loaded images and the transform."""
        if self._ready is None and self.images.size * 4 <= READY_TEST_BYTES:
            self._ready = self.transform(self.images)
        return (self._ready, _as_is) if self._ready is not None else (self.images, self.transform)


def _as_is(images: np.ndarray) -> np.ndarray:
    return images
