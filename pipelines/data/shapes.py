"""How the data reaches the model: layout, channels, size, resizing and class count, settled once before any run
starts. Each mismatch is one line that names both sides and the option that fixes it, when one does.

- layout: the model's (ptqflow.pipelines.data.preprocessing.resolve_layout), or `--input-layout` where its shape does not say;
- channels: the model's 1 or 3 must be the data's (ptqflow does not convert between greyscale and colour);
- size: the model's fixed height and width, or `--input-size HxW` when they are dynamic; data of another size is
  refused unless `--resize`, which resizes it with Pillow's bilinear filter (ptqflow.pipelines.data.datasets.resize_images);
- classes: the model's scores per image must equal the data's class count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ptqflow.common.errors import ConfigError, DataError, ModelError, first_line
from ptqflow.models.graph.onnx_model import IMAGE_CHANNELS, InputSpec, OnnxClassifier, output_width
from ptqflow.pipelines.shared.choices import DataFormat, LayoutChoice, Preprocessing
from ptqflow.pipelines.data.dataset import Dataset, Split, size_text
from ptqflow.pipelines.data.datasets import resize_images
from ptqflow.pipelines.data.preprocessing import InputTransform, format_values, parse_values, resolve_layout
from ptqflow.tracking.keys import Param, VersionTag

NO_RESIZE = "none"


@dataclass(frozen=True)
class ModelInput:
    """The images the model is fed, resolved from its input shape, the data and the options."""

    layout: str  # NHWC or NCHW
    channels: int
    size: tuple[int, int]  # (height, width) the model is fed
    data_size: tuple[int, int]  # (height, width) of the dataset's images

    @property
    def resized(self) -> bool:
        return self.size != self.data_size

    @property
    def resize_text(self) -> str:
        """The `resize` param: "none", or how and from what size the images were resized."""
        return f"bilinear from {size_text(self.data_size)}" if self.resized else NO_RESIZE

    def fit(self, split: Split) -> Split:
        """The split with its images at the model's size (resized only when they are not)."""
        return Split(self.fit_images(split.images), split.labels)

    def fit_images(self, images: np.ndarray) -> np.ndarray:
        return resize_images(images, self.size) if self.resized else images


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`--input-size 48x64` as (48, 64) (height x width); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ConfigError(f"--input-size takes HEIGHTxWIDTH in pixels, e.g. 48x48; got {text[:40]!r}")
    return int(match[1]), int(match[2])


def resolve_model_input(spec: InputSpec, data: Dataset, layout_choice: LayoutChoice = LayoutChoice.auto,
                        input_size: tuple[int, int] | None = None, resize: bool = False) -> ModelInput:
    """Check that the data fits the model's input (or can be made to, with --resize) and say how."""
    layout = resolve_layout(layout_choice, spec.layout)
    spec = spec.with_layout(layout)
    shape = spec.shape_text
    channels = spec.channels if spec.channels is not None else data.channels  # a dynamic channel dimension
    if channels not in IMAGE_CHANNELS:
        raise ModelError(f"the model's input {shape} read as {layout} has {channels} channels; ptqflow feeds 1 "
                         "(greyscale) or 3 (RGB)")
    if channels != data.channels:
        raise DataError(f"the model takes {_channels(channels)} ({layout} {shape}) but the {data.title} images have "
                        f"{_channels(data.channels)}; ptqflow does not convert between greyscale and colour: give it "
                        f"data with {_channels(channels)}")
    fixed = (spec.height, spec.width)
    if None in fixed:
        if input_size is None:
            raise ConfigError(f"the model's input {shape} has no fixed height and width; pass --input-size HxW "
                              f"(the {data.title} images are {size_text(data.image_size)})")
        if any(f is not None and f != s for f, s in zip(fixed, input_size)):
            raise ConfigError(f"--input-size {size_text(input_size)} contradicts the model's input {shape}")
        size = input_size
    else:
        if input_size is not None and input_size != fixed:
            raise ConfigError(f"--input-size {size_text(input_size)} contradicts the model's fixed "
                              f"{size_text(fixed)} input {shape}; leave --input-size out")
        size = fixed
    if size != data.image_size and not resize:
        raise ConfigError(f"the {data.title} images are {size_text(data.image_size)} but the model takes "
                          f"{size_text(size)}; pass --resize to resize them (bilinear)")
    return ModelInput(layout, channels, size, data.image_size)


def _channels(count: int) -> str:
    return f"{count}-channel images ({'greyscale' if count == 1 else 'RGB' if count == 3 else 'other'})"


def check_class_count(model: OnnxClassifier, data: Dataset, example: np.ndarray) -> int:
    """The model's scores per image, which must equal the data's class count. Read from the output's declared
    shape, or, when that is dynamic, from one onnxruntime run on `example` (a model-ready batch)."""
    width = output_width(model.proto)
    if width is None:
        from ptqflow.models.runtime.runners import OrtRunner

        try:
            scores = OrtRunner(model.path, threads=1).predict(example)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are many kinds of RuntimeError and more
            first = first_line(exc, 300)
            raise ModelError(f"onnxruntime cannot run {model.path} on one {data.title} image: {first}") from exc
        width = int(np.asarray(scores).reshape(len(example), -1).shape[1])
    if width != data.num_classes:
        raise DataError(f"the model outputs {width} scores per image but the data has {data.num_classes} classes "
                        f"({data.describe()}); pass data with one class per model output")
    return width


def input_params(data: Dataset, shape: ModelInput, transform: InputTransform) -> dict:
    """The params that say what the data is and how it reached the model (keys in ptqflow.tracking.keys.Param)."""
    params = {Param.DATA_FORMAT: data.format, Param.NUM_CLASSES: data.num_classes,
              Param.INPUT_SIZE: size_text(shape.size), Param.INPUT_CHANNELS: shape.channels,
              Param.RESIZE: shape.resize_text}
    norm = transform.normalization
    if norm is not None:
        params.update({Param.INPUT_MEAN: format_values(norm[0]), Param.INPUT_STD: format_values(norm[1])})
    return params


def input_version_tags(data: Dataset, shape: ModelInput, transform: InputTransform) -> dict[str, str]:
    """Registered-version tags with what `pull --evaluate` needs to feed the test set again as the sweep did. Only
    what differs from the default, to keep a version's tags few: no tag means CIFAR-10 pickles (found again by
    detection), images fed at their own size (the FP32 model's digest fixes it) and no mean/std."""
    V = VersionTag
    tags = {} if data.format == DataFormat.cifar10.value else {V.DATA_FORMAT: data.format}
    if shape.resized:
        tags.update({V.INPUT_SIZE: size_text(shape.size), V.RESIZE: shape.resize_text})
    norm = transform.normalization
    if norm is not None:
        tags.update({V.INPUT_MEAN: format_values(norm[0]), V.INPUT_STD: format_values(norm[1])})
    return tags


def size_from_tag(text: str | None) -> tuple[int, int] | None:
    """An `input_size` tag (HxW) as (height, width); None when absent or unreadable."""
    match = re.fullmatch(r"(\d+)x(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class RecordedFeed:
    """How a sweep fed the data to its model, read back from what it recorded: a variant run's params or a registered
    version's tags, which use the same keys (input_params, input_version_tags). What `diagnose`, `pull --evaluate`
    and `bench` need to feed the test set again exactly as the sweep did."""

    data_format: str  # "auto" when not recorded (CIFAR-10 pickles: found again by detection)
    layout: str | None  # NHWC or NCHW; None when not recorded
    preprocessing: Preprocessing
    size: tuple[int, int] | None  # (height, width) the model was fed, when recorded
    resized: bool  # whether the sweep resized the data to `size`
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def read(cls, record: Mapping[str, str]) -> RecordedFeed:
        P = Param  # VersionTag uses the same key strings for these
        return cls(data_format=record.get(P.DATA_FORMAT, DataFormat.auto.value),
                   layout=record.get(P.INPUT_LAYOUT),
                   preprocessing=Preprocessing(record.get(P.PREPROCESSING, Preprocessing.raw.value)),
                   size=size_from_tag(record.get(P.INPUT_SIZE)),
                   resized=record.get(P.RESIZE, NO_RESIZE) != NO_RESIZE,
                   mean=parse_values(P.INPUT_MEAN, record.get(P.INPUT_MEAN)),
                   std=parse_values(P.INPUT_STD, record.get(P.INPUT_STD)))

    def transform(self, layout: str | None = None) -> InputTransform:
        """The recorded preprocessing for `layout` (default: the recorded one, else NHWC)."""
        return InputTransform(layout or self.layout or "NHWC", self.preprocessing, self.mean, self.std)
