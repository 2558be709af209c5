"""Convolutions an FX config keeps in FP32 because its engine's int8 kernel is slower than the float one here.

The FX counterpart of ptqflow.models.backends.speed_check. fbgemm computes a depthwise convolution fast only in the
shapes its dedicated kernels cover; any other goes a generic way that took 69 ms for 16 channels of 48x48 at batch
64 where float took well under one. Graph preparation writes a stride-2 depthwise convolution with TF "same"
padding as a 4x4 kernel (fx_prep's pad folding), which is such a shape: a MobileNetV1 0.25 at 96x96 answered one
image in 2.3 ms with fbgemm, 0.57 ms with its four such layers in float, while the same layers are fast in
oneDNN (the x86 and onednn engines).

So every Conv2d of the graph-prepared module is timed alone at batch 1 on one thread, as the float module and as
the engine's quantized module of the same geometry, and one whose int8 module takes SLOWER_FACTOR times as long, and
MIN_SAVING_US longer, stays in float. The margins are wider than onnxruntime's check's: each torch module call
carries a fixed cost (a quantized convolution of a 32x32 fixture took 15-17 µs against 5-10 µs in float, most of it
the call), and a float layer between int8 ones adds a dequantize and a quantize the single-layer timing does not
see; with onnxruntime's margins, x86 kept a dozen small layers of a MobileNetV3-style fixture in float and lost 20
points of agreement. A generic kernel's cost is far beyond these margins. Timings are cached per geometry, engine,
torch version and CPU beside onnxruntime's.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass

from ptqflow.models.backends.speed_check import SPEED_THREADS, is_slower, timed_or_none
from ptqflow.models.runtime.layer_speed import ConvTiming

FX_SPEED_CACHE_VERSION = "fx-layer-speed-v1"
SLOWER_FACTOR = 2.0
MIN_SAVING_US = 50.0
WARMUP_RUNS = 5
TIMED_RUNS = 40


@dataclass(frozen=True)
class TorchConv:
    """Everything about one nn.Conv2d call that shapes its time."""

    input_shape: tuple[int, ...]  # 1, C, H, W
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool


def conv_calls(gm, example) -> dict[str, TorchConv]:
    """The TorchConv of every 2-D convolution module of FX graph `gm`, as one example image (`example[:1]`) calls it,
    by module name (a module called twice keeps its first call)."""
    import torch
    from torch import nn

    found: dict[str, TorchConv] = {}
    hooks = []
    for name, module in gm.named_modules():
        if type(module) is nn.Conv2d and isinstance(module.padding, tuple):
            def record(mod, args, name=name):
                if name not in found and args and getattr(args[0], "dim", lambda: 0)() == 4:
                    found[name] = TorchConv(tuple(args[0].shape), mod.out_channels, tuple(mod.kernel_size),
                                            tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation), mod.groups,
                                            mod.bias is not None)
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            gm(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return found


def slow_fx_layers(gm, example, engine: str, skip=()) -> dict[str, str]:
    """Module name -> why, for the convolutions of `gm` whose int8 module under `engine` is slower than float by
    the margins above. Modules in `skip` (already float) and convolutions the engine cannot run are not kept."""
    slow = {}
    for name, conv in conv_calls(gm, example).items():
        if name in skip:
            continue
        key, payload = fx_timing_key(conv, engine)
        timing = timed_or_none(key, payload, lambda: time_torch_conv(conv, engine))
        if is_slower(timing, SLOWER_FACTOR, MIN_SAVING_US):
            slow[name] = (f"{engine} int8 kernel slower here: {timing.int8_us:.1f} µs against {timing.fp32_us:.1f} µs "
                          f"in FP32 (batch 1, {SPEED_THREADS} thread)")
    return slow


def fx_timing_key(conv: TorchConv, engine: str) -> tuple[str, dict]:
    """The cache key of one convolution's timings under `engine` and the payload it hashes: all that shapes them."""
    import torch

    from ptqflow.models.runtime.machine import cpu_description

    payload = {"version": FX_SPEED_CACHE_VERSION, "conv": asdict(conv), "engine": engine, "threads": SPEED_THREADS,
               "torch": torch.__version__, "cpu": list(cpu_description())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(), payload


def time_torch_conv(conv: TorchConv, engine: str) -> ConvTiming:
    """Median time of `conv` as a float nn.Conv2d and as `engine`'s quantized Conv2d (per-channel int8 weights,
    uint8 activations in channels-last, as a quantized model passes them on), in microseconds, the two run in turn."""
    import torch
    from torch import nn
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    threads, previous_engine = torch.get_num_threads(), torch.backends.quantized.engine
    torch.set_num_threads(SPEED_THREADS)
    torch.backends.quantized.engine = engine
    try:
        generator = torch.Generator().manual_seed(0)
        fp32 = nn.Conv2d(conv.input_shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias).eval()
        int8 = QuantizedConv2d(conv.input_shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, conv.bias)
        weight = fp32.weight.detach()
        scales = weight.abs().flatten(1).amax(1).clamp_min(1e-6) / 127
        int8.set_weight_bias(torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales).long(), 0,
                                                        torch.qint8), fp32.bias.detach() if conv.bias else None)
        int8.scale, int8.zero_point = 0.05, 0
        x = torch.rand(conv.input_shape, generator=generator) * 4
        xq = torch.quantize_per_tensor(x, 4 / 255, 0, torch.quint8).contiguous(memory_format=torch.channels_last)
        fp32_us, int8_us = [], []
        with torch.no_grad():
            for run in range(WARMUP_RUNS + TIMED_RUNS):
                for module, value, times in ((fp32, x, fp32_us), (int8, xq, int8_us)):
                    start = time.perf_counter()
                    module(value)
                    if run >= WARMUP_RUNS:
                        times.append(1e6 * (time.perf_counter() - start))
        return ConvTiming(statistics.median(fp32_us), statistics.median(int8_us))
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = previous_engine
