"""Turn CIFAR-10 uint8 images into the exact tensor a model expects: layout and value scaling are explicit
options, recorded as run params, never guessed silently."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError
from pipelines.choices import LayoutChoice, Preprocessing

# Per-channel statistics of the CIFAR-10 training set, for models trained on standardized inputs.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


@dataclass(frozen=True)
class InputTransform:
    layout: str  # NHWC or NCHW
    preprocessing: Preprocessing = Preprocessing.raw

    def __call__(self, images_nchw: np.ndarray) -> np.ndarray:
        x = images_nchw.astype(np.float32)
        if self.preprocessing is Preprocessing.unit:
            x /= 255.0
        elif self.preprocessing is Preprocessing.standardize:
            x = (x - np.array(CIFAR10_MEAN, np.float32)[:, None, None]) / np.array(CIFAR10_STD, np.float32)[:, None, None]
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x)


def resolve_layout(choice: LayoutChoice, model_layout: str) -> str:
    if choice is LayoutChoice.auto:
        return model_layout
    if choice.value != model_layout:
        raise ConfigError(f"--input-layout {choice.value} contradicts the model, whose input is {model_layout}; "
                          "use --input-layout auto")
    return choice.value
