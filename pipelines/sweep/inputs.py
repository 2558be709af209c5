"""A sweep's inputs, loaded and derived once and shared by every variant: the dataset, the FP32 model, how the data
reaches it, the calibration set and the test split."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ptqflow.common.errors import ConfigError, ModelError
from ptqflow.models.graph.onnx_model import OnnxClassifier, load_classifier
from ptqflow.pipelines.data import shapes
from ptqflow.pipelines.data.calibration import held_out_indices, indices_digest, stratified_selection
from ptqflow.pipelines.data.dataset import Dataset, Split
from ptqflow.pipelines.data.datasets import load_dataset
from ptqflow.pipelines.data.inputs import ensure_data, ensure_model
from ptqflow.pipelines.data.preprocessing import InputTransform
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.tracking.keys import Tag


@dataclass(frozen=True)
class SweepInputs:
    """Everything loaded and derived once per sweep."""

    data: Dataset
    model: OnnxClassifier
    transform: InputTransform
    calibration_indices: np.ndarray
    calibration: np.ndarray  # model-ready float32
    test: Split  # at the model's input size (resized with --resize)
    shape: shapes.ModelInput | None = None  # how the data reaches the model (layout, channels, size, resizing)
    calibration_note: str | None = None  # classes that gave fewer calibration images than their share
    # Training images outside the calibration set (model-ready float32) that choose between AdaRound and nearest
    validation_indices: np.ndarray = field(default_factory=lambda: np.array([], np.int64))
    validation: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    @property
    def calibration_digest(self) -> str:
        return indices_digest(self.calibration_indices)

    @property
    def validation_digest(self) -> str:
        return indices_digest(self.validation_indices)

    def input_params(self) -> dict:
        """Data format, class count, input size, resizing and mean/std: params of the parent and every variant."""
        return shapes.input_params(self.data, self.shape, self.transform) if self.shape else {}

    def input_tags(self) -> dict[str, str]:
        return {Tag.CALIBRATION_SHORTFALL: self.calibration_note} if self.calibration_note else {}


def prepare_inputs(options: SweepOptions) -> SweepInputs:
    """Load and validate model and data, check that they fit each other, build the calibration set. Raises
    PtqflowError on bad input, before any run starts."""
    model = load_classifier(ensure_model(options.model_path, options.fetch_missing, options.resnet8_url))
    if model.input.batch_size not in (None, 1):
        raise ModelError(f"{model.path}: the input's batch dimension is fixed at {model.input.batch_size}; ptqflow "
                         "runs models with a dynamic batch dimension or a batch of 1: re-export the model with one")
    data = load_dataset(ensure_data(options.data_dir, options.fetch_missing, options.cifar10_url,
                                    options.cifar10_md5), options.data_format)
    shape = shapes.resolve_model_input(model.input, data, options.input_layout, options.input_size, options.resize)
    transform = InputTransform(shape.layout, options.preprocessing, options.mean, options.std)
    transform.check_channels(shape.channels)
    test = shape.fit(data.test.head(options.test_limit or None))
    shapes.check_class_count(model, data, transform(test.images[:1]))
    inputs = SweepInputs(data=data, model=model, transform=transform, calibration_indices=np.array([], np.int64),
                         calibration=np.zeros((0,), np.float32), test=test, shape=shape)
    if not options.variants:  # an FP32 baseline needs no calibration set
        return inputs
    return with_calibration(inputs, options.calibration_size, options.calibration_seed, options.validation_size)


def with_calibration(inputs: SweepInputs, size: int, seed: int, validation_size: int = 0) -> SweepInputs:
    """`inputs` with the calibration set `size` images drawn stratified by class from the training split with
    `seed`, and up to `validation_size` other training images held out beside it (the rest is shared: nothing is
    loaded again)."""
    data = inputs.data
    if size > len(data.train):
        raise ConfigError(f"--calibration-size {size} exceeds the {len(data.train)} training images; pass a "
                          "smaller --calibration-size")
    selection = stratified_selection(data.train.labels, size, seed, data.num_classes)
    note = selection.note(data.class_names)
    if note:
        say(f"[yellow]![/] {note}")
    images = inputs.shape.fit_images(data.train.images[selection.indices])
    held_out = held_out_indices(data.train.labels, selection.indices, validation_size, seed, data.num_classes)
    validation = (inputs.transform(inputs.shape.fit_images(data.train.images[held_out])) if len(held_out)
                  else np.zeros((0,), np.float32))
    return replace(inputs, calibration_indices=selection.indices, calibration=inputs.transform(images),
                   calibration_note=note, validation_indices=held_out, validation=validation)
