"""How long one convolution takes in onnxruntime, in FP32 and in int8, on this machine.

onnxruntime's int8 convolution is not faster everywhere: with 3 input channels (an image stem) the int8 kernel's
inner products are 27 long and most of its time goes to packing, and a depthwise convolution with few channels
leaves the int8 depthwise kernel's vector lanes empty, while the FP32 NCHWc kernels handle both well. Measured on a
MobileNetV1 0.25 at 96x96 (batch 1, one thread): the stem conv 40 µs in int8 against 17 µs in FP32, the first
depthwise conv (8 channels) 33 µs against 11 µs, every later layer faster in int8.

Each convolution is timed alone: a one-node model of its exact shape and attributes, in FP32 and as the QDQ pattern
onnxruntime fuses into QLinearConv (the kernel both the QDQ and QOperator formats run), profiled with onnxruntime's
own profiler so only the convolution kernel's time counts, not the layout reorders or the quantize/dequantize nodes
at the one-node model's edges. The weights are random: a kernel's time depends on shapes, not values.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The op names the profiler gives each kind of convolution kernel: a QDQ pattern that onnxruntime did not fuse into
# QLinearConv would time a float convolution as "int8", so the int8 model must show QLinearConv.
FP32_KERNELS = ("Conv", "FusedConv")
INT8_KERNELS = ("QLinearConv",)
WARMUP_RUNS = 5
TIMED_RUNS = 40


@dataclass(frozen=True)
class ConvShape:
    """Everything about one convolution that shapes its kernel's time."""

    input_shape: tuple[int, ...]  # N, C, H, W with N = the batch it is timed at
    weight_shape: tuple[int, ...]  # M, C / group, kH, kW
    has_bias: bool
    attributes: tuple[tuple[str, object], ...]  # strides, pads, dilations, group, auto_pad

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "weight_shape": list(self.weight_shape),
                "has_bias": self.has_bias, "attributes": [[k, v] for k, v in self.attributes]}


@dataclass(frozen=True)
class ConvTiming:
    fp32_us: float  # the FP32 kernel's median time, microseconds
    int8_us: float  # the int8 (QLinearConv) kernel's


def plain_attribute(value):
    """An ONNX attribute value as a hashable, JSON-able value (lists as tuples, strings decoded)."""
    if isinstance(value, bytes):
        return value.decode()
    return tuple(value) if isinstance(value, (list, tuple)) else value


def time_conv(shape: ConvShape, weight_dtype: str, per_channel: bool, activation_dtype: str,
              threads: int = 1) -> ConvTiming:
    """The median kernel time of `shape` in FP32 and in int8 (weights `weight_dtype`, per channel or per tensor,
    activations `activation_dtype`), in microseconds, on `threads` intra-op threads. The two models run in turn,
    run after run, so a change of load on a shared machine falls on both."""
    with tempfile.TemporaryDirectory(prefix="ptqflow-layer-speed-") as scratch:
        fp32 = _profiled(_fp32_model(shape), threads, Path(scratch) / "fp32")
        int8 = _profiled(_int8_model(shape, weight_dtype, per_channel, activation_dtype), threads,
                         Path(scratch) / "int8")
        x = np.random.default_rng(0).uniform(0, 4, shape.input_shape).astype(np.float32)
        for _ in range(WARMUP_RUNS + TIMED_RUNS):
            fp32.run(None, {"x": x})
            int8.run(None, {"x": x})
        return ConvTiming(_kernel_us(fp32, FP32_KERNELS), _kernel_us(int8, INT8_KERNELS))


def _conv_node(shape: ConvShape, inputs: list[str], output: str) -> onnx.NodeProto:
    return helper.make_node("Conv", inputs, [output], name="conv", **dict(shape.attributes))


def _graph(nodes, shape: ConvShape, initializers, output: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           list(shape.input_shape))],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _fp32_model(shape: ConvShape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape.weight_shape).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if shape.has_bias:
        inits.append(numpy_helper.from_array(np.zeros(shape.weight_shape[0], np.float32), "b"))
        inputs.append("b")
    return _graph([_conv_node(shape, inputs, "y")], shape, inits, "y")


def _int8_model(shape: ConvShape, weight_dtype: str, per_channel: bool, activation_dtype: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(w), DQ(b)) -> Q -> DQ: the pattern onnxruntime fuses into QLinearConv."""
    rng = np.random.default_rng(0)
    channels = shape.weight_shape[0]
    act = np.uint8 if activation_dtype == "uint8" else np.int8
    wtype = np.uint8 if weight_dtype == "uint8" else np.int8
    info = np.iinfo(wtype)
    weights = rng.integers(info.min, info.max, shape.weight_shape).astype(wtype)
    scales = np.full(channels if per_channel else (), 0.01, np.float32)
    zero = np.zeros_like(scales, dtype=wtype) + (128 if wtype is np.uint8 else 0)
    act_zero = np.array(128 if act is np.uint8 else 0, act)
    inits = [numpy_helper.from_array(weights, "wq"), numpy_helper.from_array(scales, "ws"),
             numpy_helper.from_array(zero.astype(wtype), "wz"), numpy_helper.from_array(np.float32(0.05), "s"),
             numpy_helper.from_array(act_zero, "z")]
    axis = {"axis": 0} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], **axis)]
    inputs = ["xd", "wd"]
    if shape.has_bias:
        inits += [numpy_helper.from_array(np.zeros(channels, np.int32), "bq"),
                  numpy_helper.from_array(np.full(channels, 0.05 * 0.01, np.float32), "bs"),
                  numpy_helper.from_array(np.zeros(channels, np.int32), "bz")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0))
        inputs.append("bd")
    nodes += [_conv_node(shape, inputs, "yf"), helper.make_node("QuantizeLinear", ["yf", "s", "z"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    return _graph(nodes, shape, inits, "y")


def _profiled(model: onnx.ModelProto, threads: int, prefix: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _kernel_us(session, kernels: tuple[str, ...]) -> float:
    """The median of the last TIMED_RUNS kernel times of `kernels` in `session`'s profile (ended here)."""
    events = json.loads(Path(session.end_profiling()).read_text())
    durations = [event["dur"] for event in events
                 if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                 and event.get("args", {}).get("op_name") in kernels]
    if not durations:
        raise RuntimeError(f"onnxruntime ran none of the kernels {', '.join(kernels)} for this convolution")
    return float(np.median(durations[-TIMED_RUNS:]))
