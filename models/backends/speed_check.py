"""Layers an onnxruntime config keeps in FP32 because their int8 kernel is slower than the FP32 one here.

A model whose stem or first depthwise convolutions run slower in int8 than in FP32 (see
ptqflow.models.runtime.layer_speed) pays for quantizing them twice: in accuracy and in time. So before onnxruntime
quantizes, every convolution of the FP32 model is timed alone at batch 1 on one thread, in FP32 and in the
variant's int8 kernel, and a layer whose int8 kernel takes at least SLOWER_FACTOR times as long, and MIN_SAVING_US
longer, stays in FP32 (the margins keep a layer that is merely as fast, or a few microseconds apart, in int8: a
float layer between int8 ones costs a dequantize and a quantize).

The timings are cached per layer shape, kernel, thread count, onnxruntime version and CPU (under
`~/.cache/ptqflow/layer-speed`), so every sweep on a machine makes the same choice for the same model, and the
choice is made once even though the MAC share, the quantizer and the diagnosis all ask for it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass

import onnx
from onnx import helper

from ptqflow.common.files import write_json_atomic
from ptqflow.models.backends.base import cache_root
from ptqflow.models.runtime.layer_speed import ConvShape, ConvTiming, plain_attribute, time_conv

SLOWER_FACTOR = 1.5
MIN_SAVING_US = 6.0
SPEED_THREADS = 1  # a single image on one thread: the kernels alone, without the threads' hand-offs
SPEED_CACHE_VERSION = "layer-speed-v2"  # v2: FP32 and int8 timed in turn
_memory: dict[str, ConvTiming] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class SlowLayer:
    node: str
    timing: ConvTiming

    @property
    def reason(self) -> str:
        return (f"int8 kernel slower here: {self.timing.int8_us:.1f} µs against {self.timing.fp32_us:.1f} µs in FP32 "
                f"(batch 1, {SPEED_THREADS} thread)")


def conv_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, ConvShape]:
    """The ConvShape of every 2-D Conv node of `model` whose input shape and weights are known, by node name."""
    from ptqflow.models.graph.layer_map import tensor_shapes

    shapes = tensor_shapes(model)
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or not node.name or len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = shapes.get(node.input[0])
        if not shape or len(shape) != 4 or any(not d for d in shape[1:]):
            continue
        attributes = tuple(sorted((a.name, plain_attribute(helper.get_attribute_value(a))) for a in node.attribute))
        found[node.name] = ConvShape((batch, *shape[1:]), weights[node.input[1]],
                                     len(node.input) > 2 and bool(node.input[2]), attributes)
    return found


def slow_int8_layers(model: onnx.ModelProto, config, skip=()) -> list[SlowLayer]:
    """The Conv nodes of `model` (the FP32 model, named as the diagnosis names its layers) whose int8 kernel under
    the onnxruntime `config` is slower than FP32 by the margins above; none when `config.speed_check` is off.
    Nodes in `skip` (already in FP32) are not timed."""
    if not getattr(config, "speed_check", False):
        return []
    slow = []
    for node, shape in conv_shapes(model).items():
        if node in skip:
            continue
        timing = timing_or_none(shape, config.weight_dtype, config.per_channel, config.activation_dtype)
        if is_slower(timing, SLOWER_FACTOR, MIN_SAVING_US):
            slow.append(SlowLayer(node, timing))
    return slow


def is_slower(timing: ConvTiming | None, factor: float, saving_us: float) -> bool:
    """Whether int8 takes at least `factor` times as long as FP32 and `saving_us` longer (False untimed)."""
    return timing is not None and timing.int8_us >= factor * timing.fp32_us \
        and timing.int8_us - timing.fp32_us >= saving_us


def timing_or_none(shape: ConvShape, weight_dtype: str, per_channel: bool, activation_dtype: str) -> ConvTiming | None:
    """The layer's timings (cached, else measured), or None for a convolution onnxruntime cannot run on its own
    here: the layer then stays in int8, as it would without the check (the quantizer, not the check, says whether it
    can be quantized)."""
    key, payload = timing_key(shape, weight_dtype, per_channel, activation_dtype)
    return timed_or_none(key, payload, lambda: time_conv(shape, weight_dtype, per_channel, activation_dtype,
                                                         SPEED_THREADS))


def timed_or_none(key: str, payload: dict, measure) -> ConvTiming | None:
    """timed_once, or None when `measure` fails (a layer that cannot be timed is no reason to fail the variant)."""
    try:
        return timed_once(key, payload, measure)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:  # noqa: BLE001
        return None


def timing_key(shape: ConvShape, weight_dtype: str, per_channel: bool, activation_dtype: str) -> tuple[str, dict]:
    """The cache key of one layer's timings and the payload it hashes: everything that shapes them."""
    import onnxruntime

    from ptqflow.models.runtime.machine import cpu_description

    payload = {"version": SPEED_CACHE_VERSION, "shape": shape.to_dict(), "weights": weight_dtype,
               "per_channel": per_channel, "activations": activation_dtype, "threads": SPEED_THREADS,
               "onnxruntime": onnxruntime.__version__, "cpu": list(cpu_description())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest(), payload


def cache_file(key: str):
    return cache_root() / "layer-speed" / f"{key}.json"


def timed_once(key: str, payload: dict, measure) -> ConvTiming:
    """The timing stored under `key` (on disk, else in this process), else `measure()`'s, stored with `payload`."""
    with _lock:  # one timing at a time: two at once would time each other
        found = _from_disk(key) or _memory.get(key)
        if found is None:
            found = measure()
            try:
                write_json_atomic(cache_file(key), {**payload, "fp32_us": found.fp32_us, "int8_us": found.int8_us})
            except OSError:  # a read-only cache: this process still decides once
                _memory[key] = found
        return found


def _from_disk(key: str) -> ConvTiming | None:
    try:
        stored = json.loads(cache_file(key).read_text())
        return ConvTiming(float(stored["fp32_us"]), float(stored["int8_us"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
