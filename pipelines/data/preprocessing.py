"""Turn dataset images (N x C x H x W, uint8 or float) into the exact tensor a model expects: layout and value
scaling are explicit options, recorded as run params, never guessed silently.

Values are first scaled by `--preprocessing` (raw: as they are; unit: divided by 255), then, when a mean and std
apply, standardized per channel: (x - mean) / std. `standardize` is raw scaling with CIFAR-10's statistics (on
0..255), unless `--mean`/`--std` give others; with `raw` or `unit`, `--mean`/`--std` apply on that scale (so ImageNet
statistics on 0..1 are `--preprocessing unit --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqflow.common.errors import ConfigError
from ptqflow.pipelines.shared.choices import LayoutChoice, Preprocessing

# Per-channel statistics of the CIFAR-10 training set, for models trained on standardized inputs.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


@dataclass(frozen=True)
class InputTransform:
    layout: str  # NHWC or NCHW
    preprocessing: Preprocessing = Preprocessing.raw
    mean: tuple[float, ...] | None = None  # per channel, after the scaling; None: standardize's preset, else none
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if (self.mean is None) != (self.std is None):
            raise ConfigError("--mean and --std go together: pass both, one value per channel")
        if self.mean is not None:
            if len(self.mean) != len(self.std):
                raise ConfigError(f"--mean has {len(self.mean)} values but --std has {len(self.std)}; pass one value "
                                  "per channel to each")
            if not all(np.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
                raise ConfigError("--mean values must be finite and --std values finite and positive")

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) subtracted and divided after the scaling, or None when values are only scaled."""
        if self.mean is not None:
            return self.mean, self.std
        if self.preprocessing is Preprocessing.standardize:
            return CIFAR10_MEAN, CIFAR10_STD
        return None

    def check_channels(self, channels: int) -> None:
        """A ConfigError when the mean/std do not have one value per image channel."""
        norm = self.normalization
        if norm is not None and len(norm[0]) != channels:
            source = "--mean/--std" if self.mean is not None else "standardize's CIFAR-10 mean/std"
            raise ConfigError(f"{source} give{'s' if self.mean is None else ''} {len(norm[0])} values per channel "
                              f"but the images have {channels} channel{'s' if channels != 1 else ''}; pass --mean "
                              "and --std with one value per channel")

    def __call__(self, images_nchw: np.ndarray) -> np.ndarray:
        x = images_nchw.astype(np.float32)
        if self.preprocessing is Preprocessing.unit:
            x /= 255.0
        norm = self.normalization
        if norm is not None:
            mean, std = norm
            x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x)


def format_values(values: tuple[float, ...]) -> str:
    """Per-channel values as params and tags record them (and parse_values reads them back): `0.5,0.25,0.125`."""
    return ",".join(repr(float(v)) for v in values)


def parse_values(option: str, text: str | None) -> tuple[float, ...] | None:
    """`--mean 0.485,0.456,0.406` as a tuple; None stays None; a ConfigError for anything but numbers."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers, one per channel (e.g. 0.5,0.5,0.5), got "
                          f"{text[:60]!r}") from None
    return values


def resolve_layout(choice: LayoutChoice, model_layout: str | None) -> str:
    """The layout to feed: the model's own, or the choice when the model's input does not say (model_layout None)."""
    if choice is LayoutChoice.auto:
        if model_layout is None:
            raise ConfigError("the model's input shape does not say whether it is NHWC or NCHW; pass --input-layout "
                              "NHWC or --input-layout NCHW")
        return model_layout
    if model_layout is not None and choice.value != model_layout:
        raise ConfigError(f"--input-layout {choice.value} contradicts the model, whose input is {model_layout}; "
                          "use --input-layout auto")
    return choice.value
