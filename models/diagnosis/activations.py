"""Float activations of an ONNX model, batch by batch (onnxruntime's qdq_loss_debug augmentation run in one session),
and the per-channel ranges of each layer's input."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

from ptqflow.models.diagnosis.records import BATCH_SIZE
from ptqflow.models.graph.layer_map import Layer, tensor_shapes


DEAD_FRACTION = 1e-6  # a channel whose max |x| is below this share of the largest channel's never carries signal


class ChannelRange:
    """max |x| per channel over batches."""

    def __init__(self):
        self.values: np.ndarray | None = None

    def add(self, x: np.ndarray, axis: int) -> None:
        x = np.abs(np.moveaxis(np.asarray(x), axis, 0)).reshape(x.shape[axis], -1).max(axis=1)
        self.values = x if self.values is None else np.maximum(self.values, x)

    def outlier(self) -> tuple[float | None, int | None]:
        """(largest channel's range over the median live channel's, largest channel). Dead channels (all zero:
        ReLU units that never fire, common in MobileNets) are left out of the median: they cost the others no bits,
        and with them the median is 0 and the ratio infinite. None when fewer than two channels are live."""
        if self.values is None:
            return None, None
        live = self.values[self.values > DEAD_FRACTION * self.values.max()]
        if live.size < 2:
            return None, None
        return float(self.values.max() / np.median(live)), int(np.argmax(self.values))


def session_options():
    """onnxruntime session options for the diagnosis' sessions: graph optimization off (collect_activations' own
    setting; the Q/DQ nodes run as written), warnings off, and worker threads that sleep rather than spin between
    runs: several sessions are alive at once and run in turn, each one's spinning threads would slow down the others
    and numpy (a session's results do not depend on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class ActivationReader:
    """A model augmented by `modify_model_output_intermediate_tensors`, in one onnxruntime session run batch by batch:
    each batch's intermediate tensors (flattened by the augmented model's Reshape outputs), named as
    `collect_activations` names them. The session is made as collect_activations makes its own (graph optimization
    off, CPU provider; see `session_options`), once instead of once per batch."""

    def __init__(self, augmented: Path, input_name: str):
        import onnxruntime as ort
        from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX  # what collect_activations strips

        self._session = ort.InferenceSession(str(augmented), sess_options=session_options(),
                                             providers=["CPUExecutionProvider"])
        self._input_name = input_name
        # (position in the session's outputs, tensor name) of the saved tensors
        self._saved = [(i, output.name[:-len(_TENSOR_SAVE_POSTFIX)])
                       for i, output in enumerate(self._session.get_outputs())
                       if output.name.endswith(_TENSOR_SAVE_POSTFIX)]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._session.run(None, {self._input_name: batch})
        return {name: outputs[i] for i, name in self._saved}


def augmented_model(model_path: Path, target: Path) -> Path:
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    with contextlib.redirect_stdout(io.StringIO()):
        modify_model_output_intermediate_tensors(str(model_path), str(target))
    return target


def unflatten(flat: np.ndarray, shape: list | None, batch: int) -> np.ndarray | None:
    if not shape or any(d is None for d in shape[1:]):
        return None
    return flat.reshape(batch, *shape[1:])


def model_input_name(model) -> str:
    initializers = {init.name for init in model.graph.initializer}
    return next(value.name for value in model.graph.input if value.name not in initializers)


def add_channel_ranges(ranges: dict[str, ChannelRange], layers: list[Layer], activations: dict[str, np.ndarray],
                       shapes: dict, images: int) -> None:
    """Add one batch of `images` to each layer's input channel ranges, from the FP32 model's `activations` (as an
    ActivationReader gives them; `shapes` from tensor_shapes unflattens them)."""
    for layer in layers:
        x = activations.get(layer.input)
        x = unflatten(x, shapes.get(layer.input), images) if x is not None else None
        if x is not None:
            ranges[layer.name].add(x, layer.channel_axis)


def input_channel_ranges(float_onnx_path: Path, images: np.ndarray, layers: list[Layer],
                         batch_size: int = BATCH_SIZE) -> dict[str, ChannelRange]:
    """Per layer, max |x| of each channel of its input over `images`, from the FP32 ONNX model."""
    import onnx

    model = onnx.load(str(float_onnx_path))
    shapes, input_name = tensor_shapes(model), model_input_name(model)
    ranges = {layer.name: ChannelRange() for layer in layers}
    with tempfile.TemporaryDirectory(prefix="ptqflow-diagnosis-") as scratch:
        collect = ActivationReader(augmented_model(Path(float_onnx_path), Path(scratch) / "float_augmented.onnx"),
                                   input_name)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            add_channel_ranges(ranges, layers, collect(batch), shapes, len(batch))
    return ranges
