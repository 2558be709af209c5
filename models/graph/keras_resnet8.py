"""Convert the MLPerf Tiny ResNet8 Keras HDF5 file to ONNX, without TensorFlow.

The layer graph comes from the file's own `model_config` JSON and the weights from `model_weights` (found through
each layer's `weight_names`), so nothing depends on Keras' auto-generated layer names. BatchNormalization is folded
into the Conv2D before it, and the graph computes in NCHW behind one input Transpose, like the tf2onnx export of the
same file. Both therefore share one interface: input `input_1:0` float32 NHWC [N, 32, 32, 3] holding raw 0..255
pixels, output softmax probabilities [N, 10].

Only the layer types and options this model uses are supported; anything else is refused with a ModelError.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ptqflow.common.errors import ModelError
from ptqflow.common.files import file_sha256, write_atomic

INPUT_NAME = "input_1:0"
# tf2onnx's output name in the reference export, so code written against one file runs on the other.
OUTPUT_NAME = "Identity:0"
INPUT_SHAPE_HWC = (32, 32, 3)
NUM_CLASSES = 10
OPSET = 13
IR_VERSION = 7  # the oldest IR with opset 13, as in the reference export, so older runtimes load it too
SOURCE_SHA256_KEY = "source_sha256"  # metadata_props key: SHA-256 of the .h5 the model was converted from
_NCHW_FROM_NHWC = [0, 3, 1, 2]
_NHWC_FROM_NCHW = [0, 2, 3, 1]


@dataclass(frozen=True)
class _KerasLayer:
    class_name: str
    name: str
    config: dict
    inputs: tuple[str, ...]
    weights: dict[str, np.ndarray]  # "kernel", "bias", "gamma", "moving_mean", ...


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # without the batch dimension: (C, H, W) for feature maps, (F,) once flattened


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ResNet8 has ~78k weights; a (compressed) dataset far larger than any layer of it is refused before it is read.
_MAX_WEIGHT_VALUES = 10_000_000


def _read_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    # weight_names are paths relative to the layer's group, e.g. "conv2d/kernel:0".
    weights = {}
    for weight_name in map(_decode, group.attrs.get("weight_names", [])):
        short_name = weight_name.rsplit("/", 1)[-1].split(":")[0]
        dataset = group[weight_name]
        if not isinstance(dataset, h5py.Dataset) or dataset.size > _MAX_WEIGHT_VALUES:
            raise ValueError(f"weight {weight_name} is not an array of at most {_MAX_WEIGHT_VALUES} values")
        weights[short_name] = np.asarray(dataset, dtype=np.float64)
    return weights


def _check_layer_types(input_name, output_name, layers: list[_KerasLayer]) -> None:
    """Names must be strings and configs dicts, so later lookups fail as ModelError rather than deep inside."""
    for layer in layers:
        if not (isinstance(layer.class_name, str) and isinstance(layer.name, str) and isinstance(layer.config, dict)
                and all(isinstance(name, str) for name in layer.inputs)):
            raise TypeError(f"layer {str(layer.name)[:60]!r} has a non-string name or input, or a non-dict config")
    if not isinstance(input_name, str) or not isinstance(output_name, str):
        raise TypeError("input_layers and output_layers must name layers")


def _read_keras_file(path: Path) -> tuple[list[_KerasLayer], str, str]:
    """Layers in the file's (topological) order, plus the names of the input and output layers."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ModelError(f"{path} is not a readable HDF5 file ({exc}); expected the MLPerf Tiny ResNet8 .h5") from exc
    with h5:
        try:
            if "model_config" not in h5.attrs or "model_weights" not in h5:
                raise ModelError(f"{path} is not a Keras model file saved with its config and weights "
                                 "(no model_config or model_weights)")
            model = json.loads(_decode(h5.attrs["model_config"]))
            if model["class_name"] not in ("Functional", "Model"):
                raise ModelError(f"{path} holds a Keras {model['class_name']} model; the converter reads the "
                                 "functional MLPerf Tiny ResNet8")
            graph = model["config"]
            (input_name, *_), = graph["input_layers"]
            (output_name, *_), = graph["output_layers"]
            layers = []
            for layer in graph["layers"]:
                nodes = layer["inbound_nodes"]
                if len(nodes) > 1:
                    raise ModelError(f"{path}: layer {layer['name']} is shared between several calls, which "
                                     "the converter does not support")
                inputs = tuple(inbound[0] for inbound in nodes[0]) if nodes else ()
                weights = _read_weights(h5["model_weights"][layer["name"]])
                layers.append(_KerasLayer(layer["class_name"], layer["name"], layer["config"], inputs, weights))
            _check_layer_types(input_name, output_name, layers)
        # OSError and RuntimeError: h5py reading a damaged file; RecursionError: absurdly nested JSON.
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError, RuntimeError,
                MemoryError) as exc:
            raise ModelError(f"{path}: cannot read its Keras 2 model config and weights "
                             f"({type(exc).__name__}: {_one_line(exc)})") from exc
    names = {layer.name for layer in layers}
    if input_name not in names or output_name not in names:
        raise ModelError(f"{path}: its model input or output layer is not among its layers")
    return layers, input_name, output_name


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(pad_before, pad_after, output_size) for Keras/TensorFlow "same": any odd padding goes after."""
    output = math.ceil(size / stride)
    total = max((output - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, output


def _fold_batch_norm(kernel: np.ndarray, bias: np.ndarray, bn: _KerasLayer) -> tuple[np.ndarray, np.ndarray]:
    """Fold y = gamma * (x - mean) / sqrt(var + eps) + beta into the conv before it (kernel last axis = out)."""
    channels = kernel.shape[-1]
    gamma = bn.weights.get("gamma", np.ones(channels))
    beta = bn.weights.get("beta", np.zeros(channels))
    scale = gamma / np.sqrt(bn.weights["moving_variance"] + float(bn.config["epsilon"]))
    return kernel * scale, (bias - bn.weights["moving_mean"]) * scale + beta


class _Converter:
    def __init__(self, layers: list[_KerasLayer], path: Path):
        self.path = path
        self.layers = {layer.name: layer for layer in layers}
        self.consumers: dict[str, list[_KerasLayer]] = defaultdict(list)
        for layer in layers:
            for name in layer.inputs:
                self.consumers[name].append(layer)
        self.outputs: dict[str, _Tensor] = {}  # Keras layer name -> the ONNX tensor holding its output
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def fail(self, layer: _KerasLayer, problem: str) -> ModelError:
        return ModelError(f"{self.path}: layer {layer.name} ({layer.class_name}) {problem}; "
                          "this is not the MLPerf Tiny ResNet8 the converter supports")

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32)
                                                         if array.dtype.kind == "f" else array, name))
        return name

    def emit(self, op: str, inputs: list[str], name: str, shape: tuple[int, ...], **attributes) -> _Tensor:
        output = f"{name}:0"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))
        return _Tensor(output, shape)

    def single_input(self, layer: _KerasLayer) -> _Tensor:
        if len(layer.inputs) != 1:
            raise self.fail(layer, f"has {len(layer.inputs)} inputs instead of 1")
        return self.outputs[layer.inputs[0]]

    def activate(self, layer: _KerasLayer, tensor: _Tensor, activation: str) -> _Tensor:
        if activation == "linear":
            return tensor
        if activation == "relu":
            return self.emit("Relu", [tensor.name], f"{layer.name}/Relu", tensor.shape)
        if activation == "softmax" and len(tensor.shape) == 1:
            return self.emit("Softmax", [tensor.name], f"{layer.name}/Softmax", tensor.shape, axis=-1)
        raise self.fail(layer, f"uses activation {activation!r} on a tensor of shape {tensor.shape}")

    def check_channels_last(self, layer: _KerasLayer) -> None:
        if layer.config.get("data_format", "channels_last") != "channels_last":
            raise self.fail(layer, "is not channels_last")

    def window(self, layer: _KerasLayer, tensor: _Tensor, kernel: tuple[int, int],
               strides: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
        """ONNX pads [top, left, bottom, right] and the output (H, W) of a Keras conv or pooling window."""
        padding = layer.config.get("padding")
        (_, height, width) = tensor.shape
        if padding == "valid":
            return [0, 0, 0, 0], ((height - kernel[0]) // strides[0] + 1, (width - kernel[1]) // strides[1] + 1)
        if padding == "same":
            top, bottom, out_h = _same_padding(height, kernel[0], strides[0])
            left, right, out_w = _same_padding(width, kernel[1], strides[1])
            return [top, left, bottom, right], (out_h, out_w)
        raise self.fail(layer, f"has padding {padding!r}")

    def input_layer(self, layer: _KerasLayer) -> None:
        batch, *shape_hwc = layer.config["batch_input_shape"]
        if batch is not None or tuple(shape_hwc) != INPUT_SHAPE_HWC:
            raise self.fail(layer, f"takes {[batch, *shape_hwc]} instead of [None, 32, 32, 3]")
        height, width, channels = INPUT_SHAPE_HWC
        self.outputs[layer.name] = self.emit("Transpose", [INPUT_NAME], f"{layer.name}/to_nchw",
                                             (channels, height, width), perm=_NCHW_FROM_NHWC)

    def conv2d(self, layer: _KerasLayer) -> None:
        tensor = self.single_input(layer)
        config = layer.config
        self.check_channels_last(layer)
        if len(tensor.shape) != 3 or tuple(config.get("dilation_rate", (1, 1))) != (1, 1) \
                or config.get("groups", 1) != 1:
            raise self.fail(layer, "is dilated, grouped or applied to a flat tensor")
        kernel = layer.weights.get("kernel")
        kernel_size, strides = tuple(config["kernel_size"]), tuple(config["strides"])
        expected_shape = (*kernel_size, tensor.shape[0], config["filters"])
        if kernel is None or kernel.shape != expected_shape:
            raise self.fail(layer, f"has kernel {None if kernel is None else kernel.shape}, "
                                   f"expected {expected_shape}")
        bias = layer.weights["bias"] if config.get("use_bias", True) else np.zeros(config["filters"])
        consumers = self.consumers[layer.name]
        output_layer = layer
        # A BatchNormalization that alone reads a linear conv disappears into the conv's weights.
        if config["activation"] == "linear" and len(consumers) == 1 \
                and consumers[0].class_name == "BatchNormalization":
            output_layer = consumers[0]
            if output_layer.config.get("axis") not in ([3], 3, [-1], -1):
                raise self.fail(output_layer, "does not normalize the channel axis")
            kernel, bias = _fold_batch_norm(kernel, bias, output_layer)
        pads, (out_h, out_w) = self.window(layer, tensor, kernel_size, strides)
        weights = self.constant(f"{layer.name}/kernel", kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        bias_name = self.constant(f"{layer.name}/bias", bias)
        result = self.emit("Conv", [tensor.name, weights, bias_name], f"{layer.name}/Conv",
                           (config["filters"], out_h, out_w), kernel_shape=list(kernel_size),
                           strides=list(strides), pads=pads, dilations=[1, 1], group=1)
        self.outputs[output_layer.name] = self.activate(layer, result, config["activation"])

    def batch_normalization(self, layer: _KerasLayer) -> None:
        if layer.name not in self.outputs:  # already folded into its conv otherwise
            raise self.fail(layer, "does not directly follow a linear Conv2D that it alone reads")

    def activation(self, layer: _KerasLayer) -> None:
        self.outputs[layer.name] = self.activate(layer, self.single_input(layer), layer.config["activation"])

    def add(self, layer: _KerasLayer) -> None:
        tensors = [self.outputs[name] for name in layer.inputs]
        if len(tensors) < 2 or len({t.shape for t in tensors}) != 1:
            raise self.fail(layer, f"adds tensors of shapes {[t.shape for t in tensors]}")
        result = tensors[0]
        for index, tensor in enumerate(tensors[1:], start=1):
            result = self.emit("Add", [result.name, tensor.name], f"{layer.name}/Add_{index}", result.shape)
        self.outputs[layer.name] = result

    def average_pooling2d(self, layer: _KerasLayer) -> None:
        tensor = self.single_input(layer)
        self.check_channels_last(layer)
        pool_size = tuple(layer.config["pool_size"])
        strides = tuple(layer.config.get("strides") or pool_size)
        pads, (out_h, out_w) = self.window(layer, tensor, pool_size, strides)
        # ONNX's default count_include_pad=0 averages over real pixels only, as Keras does.
        self.outputs[layer.name] = self.emit("AveragePool", [tensor.name], f"{layer.name}/AveragePool",
                                             (tensor.shape[0], out_h, out_w), kernel_shape=list(pool_size),
                                             strides=list(strides), pads=pads)

    def flatten(self, layer: _KerasLayer) -> None:
        tensor = self.single_input(layer)
        self.check_channels_last(layer)
        channels, height, width = tensor.shape
        if (height, width) != (1, 1):  # Keras flattens in HWC order; with a 1x1 map CHW is the same order
            tensor = self.emit("Transpose", [tensor.name], f"{layer.name}/to_nhwc", (height, width, channels),
                               perm=_NHWC_FROM_NCHW)
        features = channels * height * width
        shape = self.constant(f"{layer.name}/shape", np.array([-1, features], dtype=np.int64))
        self.outputs[layer.name] = self.emit("Reshape", [tensor.name, shape], f"{layer.name}/Reshape", (features,))

    def dense(self, layer: _KerasLayer) -> None:
        tensor = self.single_input(layer)
        kernel = layer.weights.get("kernel")
        units = layer.config["units"]
        if len(tensor.shape) != 1 or kernel is None or kernel.shape != (tensor.shape[0], units):
            raise self.fail(layer, f"has kernel {None if kernel is None else kernel.shape} for input "
                                   f"{tensor.shape} and {units} units")
        result = self.emit("MatMul", [tensor.name, self.constant(f"{layer.name}/kernel", kernel)],
                           f"{layer.name}/MatMul", (units,))
        if layer.config.get("use_bias", True):
            result = self.emit("Add", [result.name, self.constant(f"{layer.name}/bias", layer.weights["bias"])],
                               f"{layer.name}/BiasAdd", (units,))
        self.outputs[layer.name] = self.activate(layer, result, layer.config["activation"])

    def convert(self, input_name: str, output_name: str) -> onnx.ModelProto:
        handlers = {"InputLayer": self.input_layer, "Conv2D": self.conv2d,
                    "BatchNormalization": self.batch_normalization, "Activation": self.activation,
                    "Add": self.add, "AveragePooling2D": self.average_pooling2d, "Flatten": self.flatten,
                    "Dense": self.dense}
        for layer in self.layers.values():
            if layer.class_name not in handlers:
                raise self.fail(layer, "is a layer type the converter does not support")
            try:
                handlers[layer.class_name](layer)
            # A config entry or input the model should have, or one of an absurd value (zero stride, ...).
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError,
                    MemoryError) as exc:
                raise self.fail(layer, f"has an unexpected config or input "
                                       f"({type(exc).__name__}: {_one_line(exc)})") from exc
        if self.layers[input_name].class_name != "InputLayer":
            raise self.fail(self.layers[input_name], "is the model input but not an InputLayer")
        output = self.outputs.get(output_name)
        if output is None or not self.nodes:
            raise self.fail(self.layers[output_name], "is the model output but computes nothing")
        if output.shape != (NUM_CLASSES,) or self.nodes[-1].op_type != "Softmax" \
                or self.nodes[-1].output[0] != output.name:
            raise self.fail(self.layers[output_name], f"does not end the model with a softmax over {NUM_CLASSES} "
                                                      "classes")
        self.nodes[-1].output[0] = OUTPUT_NAME
        graph = helper.make_graph(
            self.nodes, "resnet8",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *INPUT_SHAPE_HWC])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES])],
            self.initializers)
        model = helper.make_model(graph, producer_name="ptqflow.keras_resnet8",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


def convert_h5_to_onnx(h5_path: Path, onnx_path: Path) -> Path:
    """Convert the Keras ResNet8 at h5_path to ONNX at onnx_path (written whole, then renamed) and return it.

    The ONNX metadata records the source file's SHA-256 under SOURCE_SHA256_KEY.
    """
    h5_path, onnx_path = Path(h5_path), Path(onnx_path)
    layers, input_name, output_name = _read_keras_file(h5_path)
    model = _Converter(layers, h5_path).convert(input_name, output_name)
    helper.set_model_props(model, {SOURCE_SHA256_KEY: file_sha256(h5_path), "source_file": h5_path.name})
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"{h5_path}: the converted graph fails the ONNX checker ({_one_line(exc)}); "
                         "this is not the MLPerf Tiny ResNet8 the converter supports") from exc
    write_atomic(onnx_path, model.SerializeToString())
    return onnx_path


def recorded_source_sha256(onnx_path: Path) -> str | None:
    """The source SHA-256 stored by convert_h5_to_onnx, or None if the file is unreadable or has none."""
    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except (OSError, DecodeError):
        return None
    return next((prop.value for prop in model.metadata_props if prop.key == SOURCE_SHA256_KEY), None)
