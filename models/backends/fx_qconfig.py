"""The FX quantization recipe's QConfigMapping: activation observers (percentile by default, the k-th largest value
per batch), per-channel or per-tensor weight observers, and the modules kept in float (softmax, the classifier head,
layers a variant asks for)."""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.observer import HistogramObserver, MovingAverageMinMaxObserver
from torch.ao.quantization.observer import MinMaxObserver as _MinMaxObserver

from ptqflow.models.graph.fx_modules import clip_range, is_depthwise, sole_reader_ranges
from ptqflow.models.graph.fx_prep import SOFTMAX_FUNCS, SOFTMAX_TYPES


TOPK_ROWS = 8  # kth_largest's split: measured fastest for 0.1-2 M values on 2 cores


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the flat tensor `x`, exactly ``torch.topk(x, k).values.min()``, about 2.5x
    faster on calibration-sized tensors (a 1.6 M-value topk took 6-12 ms; FX calibration is mostly these). The
    values are split in rows and each row's top k taken (rows in parallel, each in cache): fewer than k values
    exceed the answer, so every row's values above it are among that row's top k, and with ties at most k per
    row reach it, so the k-th largest of the rows' top k is the answer itself."""
    width = x.numel() // TOPK_ROWS
    if width < 4 * k:
        return torch.topk(x, k).values.min()
    rows = x[:TOPK_ROWS * width].view(TOPK_ROWS, width)
    candidates = torch.cat([torch.topk(rows, k, dim=1).values.flatten(), x[TOPK_ROWS * width:]])
    return torch.topk(candidates, k).values.min()


# A percentile is taken over at least this many values: a batch of one image (a model with its batch fixed at 1)
# holds a few thousand, whose 99.995th percentile is their maximum, and the average of per-image maxima clips far
# more than the percentile of the data (FX agreed 90 % on a batch-1 MobileNetV1 whose onnxruntime variant, with a
# histogram over all images, agreed 99 %).
POOL_VALUES = 1 << 16


class PercentileObserver(_MinMaxObserver):
    """Activation observer: range = average over calibration batches of the per-batch
    ``percentile`` (upper) / ``100 - percentile`` (lower) of the values (exact: ``kth_largest``);
    a range that includes 0 is kept (post-ReLU tensors get min 0).  Similar to
    onnxruntime's CalibrationMethod.Percentile; use equal-size calibration batches. Batches of
    fewer than ``pool_values`` values are pooled until they hold that many (what is left at the
    end counts only when nothing else did)."""

    def __init__(self, percentile: float = 99.995, bounds: tuple[float, float] | None = None,
                 pool_values: int = POOL_VALUES, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.bounds = bounds  # the range of the clip that alone reads this tensor (activation_bounds)
        self.pool_values = int(pool_values)
        self._pending: list = []  # small batches waiting for a full pool
        self.register_buffer("_n", torch.tensor(0.0))
        self.register_buffer("_lo", torch.tensor(0.0))
        self.register_buffer("_hi", torch.tensor(0.0))

    def forward(self, x_orig):
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        if x.numel() < self.pool_values or self._pending:
            self._pending.append(x)
            x = torch.cat(self._pending)
            if x.numel() < self.pool_values:
                if self._n == 0:  # a provisional range until the first pool is full
                    self._set_range(*self._percentiles(x))
                return x_orig
            self._pending = []
        hi, lo = self._percentiles(x)
        n = self._n + 1
        self._hi.copy_(self._hi + (hi - self._hi) / n)
        self._lo.copy_(self._lo + (lo - self._lo) / n)
        self._n.copy_(n)
        self._set_range(self._hi, self._lo)
        return x_orig

    def _percentiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = max(1, int(math.ceil((1.0 - self.percentile / 100.0) * x.numel())))
        return kth_largest(x, k), -kth_largest(-x, k)

    def _set_range(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        low = torch.minimum(lo, torch.zeros_like(lo))
        high = torch.maximum(hi, torch.zeros_like(hi))
        if self.bounds is not None:  # quantizing to the clip's range is the clip: saturation does it
            low, high = low.clamp(min=self.bounds[0]), high.clamp(max=self.bounds[1])
        self.min_val.copy_(low)
        self.max_val.copy_(high)


class _Clamped:
    """An observer that sees its tensor clamped to `bounds`, the range of the clip that alone reads it (see
    activation_bounds), as PercentileObserver keeps its range to them: without, a min-max or histogram observer takes
    in the large negative values a ReLU6 then drops (a MobileNet's dead channels), and the 8 bits spread over a range
    mostly never passed on (a VWW-shaped MobileNetV1 agreed 60 % with FP32 under either)."""

    def __init__(self, bounds: tuple[float, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.bounds = bounds

    def forward(self, x_orig):
        if self.bounds is None:
            return super().forward(x_orig)
        super().forward(x_orig.detach().clamp(*self.bounds))
        return x_orig


class ClampedMinMaxObserver(_Clamped, _MinMaxObserver):
    pass


class ClampedHistogramObserver(_Clamped, HistogramObserver):
    pass


class ClampedMovingAverageMinMaxObserver(_Clamped, MovingAverageMinMaxObserver):
    pass


def qconfig_mapping(
    backend: str = "x86",
    *,
    activation_observer: str = "percentile",
    weight_observer: str = "perchannel_minmax",
    reduce_range: bool = False,
    percentile: float = 99.995,
    keep_float: Sequence[Any] = (),
    float_modules: Sequence[str] = (),
    bounded_outputs: dict[str, tuple[float, float]] | None = None,
    seven_bit_outputs: Sequence[str] = (),
):
    """QConfigMapping of the ptqflow recipe for ``backend`` in {"fbgemm", "x86", "qnnpack", "onednn"}.

    Starts from ``get_default_qconfig_mapping(backend)`` (keeps fixed-qparams ops
    etc.), replaces the global/conv/linear/add qconfig by quint8 activations
    (``activation_observer``: "percentile" (recipe default, see ``PercentileObserver``,
    ``percentile``), "histogram", "minmax", "moving_minmax") without ``reduce_range``
    (VNNI CPUs do not saturate) and qint8 symmetric per-channel weights with range
    [-127, 127] (scale = max|w|/127, same grid as onnxruntime and
    ``ptqflow.models.adaround.onnx.adaround_onnx``), and keeps all softmax flavours in float
    (qconfig None).  ``keep_float`` adds further module types / functions kept in
    float; ``float_modules`` module names kept in float (e.g. ``classifier_head(gm)``).
    ``bounded_outputs`` (module name -> (low, high), see ``activation_bounds``): the observers
    of those modules' outputs keep to the range of the clip that follows them.
    ``seven_bit_outputs``: modules whose outputs are quantized with ``reduce_range`` (see
    ``fbgemm_depthwise_inputs``).
    """
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    act = {
        "minmax": ClampedMinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        "histogram": ClampedHistogramObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        "moving_minmax": ClampedMovingAverageMinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        "percentile": PercentileObserver.with_args(percentile=percentile, dtype=torch.quint8,
                                                   reduce_range=reduce_range),
    }[activation_observer]
    wt = {
        # [-127, 127]: scale = max|w| / 127, same grid as onnxruntime's symmetric int8 weights
        # (and ptqflow.models.adaround's "per_channel_sym_int8"), so pre-rounded weights stay exact
        "perchannel_minmax": PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127),
        "minmax": MinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127),
    }[weight_observer]
    if backend == "qnnpack" and weight_observer == "perchannel_minmax":
        pass  # qnnpack supports per-channel for conv/linear in recent torch
    qc = QConfig(activation=act, weight=wt)
    m = get_default_qconfig_mapping(backend)
    m.set_global(qc)
    # object-type entries of the default mapping would override global for these ops
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, F.relu, operator.add, torch.add,
              operator.mul, torch.mul, nn.AdaptiveAvgPool2d, nn.AvgPool2d, F.adaptive_avg_pool2d,
              nn.BatchNorm2d, torch.flatten, torch.cat):
        m.set_object_type(t, qc)
    for t in (*SOFTMAX_TYPES, *SOFTMAX_FUNCS, *keep_float):
        m.set_object_type(t, None)
    for name in dict.fromkeys([*(bounded_outputs or {}), *seven_bit_outputs]):
        observer = act.with_args(reduce_range=reduce_range or name in seven_bit_outputs,
                                 bounds=(bounded_outputs or {}).get(name))
        m.set_module_name(name, QConfig(activation=observer, weight=wt))
    for name in float_modules:
        m.set_module_name(name, None)
    return m


def activation_bounds(gm) -> dict[str, tuple[float, float]]:
    """Conv and Linear modules of FX graph `gm` whose output only a clip (ReLU6, Clip with constant bounds that
    include 0) reads: module name -> the clip's (low, high). FX fuses Conv with ReLU but not with ReLU6 or Clip, so
    the layer's output is observed before the clip and quantized with the negative values the clip then drops: a
    range wider than what flows on, and a zero point that is not 0, which fbgemm's depthwise kernel computes wrongly
    (up to 149 steps off in a MobileNetV2, where onednn is exact). Quantizing the output to the clip's range is the
    clip itself (values outside it saturate), as TFLite's fused activations do."""
    return {name: clip for name, clip in sole_reader_ranges(gm).items()
            if isinstance(gm.get_submodule(name), (nn.Conv1d, nn.Conv2d, nn.Linear)) and clip[0] <= 0.0 < clip[1]}


def fbgemm_depthwise_inputs(gm, float_modules: Sequence[str] = ()) -> list[str]:
    """The modules whose output (through clips, which keep its quantization) feeds a depthwise convolution: fbgemm's
    depthwise kernels multiply uint8 activations by int8 weights in pairs summed to 16 bits, which saturate once
    255 * |w1| + 255 * |w2| exceeds 32767 (0.1-0.9% of a MobileNetV2's depthwise outputs off by up to 242 steps,
    VNNI or not; onednn, the x86 engine's, is exact). Seven-bit activations (reduce_range, torch's own fbgemm
    default; the recipe's fbgemm_saturation "seven-bit") keep every pair below it. Depthwise convolutions in `float_modules` stay float and need no such input."""
    if not hasattr(gm, "graph"):
        return []
    producers = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_depthwise(gm.get_submodule(node.target)) or not node.args \
                or node.target in float_modules:
            continue
        source = node.args[0]
        while getattr(source, "op", None) == "call_module" and (
                clip_range(gm.get_submodule(source.target)) is not None
                or isinstance(gm.get_submodule(source.target), nn.ReLU)) and source.args:
            source = source.args[0]  # a clip or ReLU after a conv is fused with it or shares its quantization
        if getattr(source, "op", None) == "call_module" and source.target not in producers:
            producers.append(source.target)
    return producers


def observe_whole_input_range(prepared) -> list[str]:
    """Make the observers of `prepared`'s model input (before calibration) min-max observers: the first observers
    reached from the input through functions alone (a permute, a division by 255), not through a layer. The input is
    pixels: its extremes are the ends of the pixel scale, not outliers, and a percentile clips the brightest ones and
    lays its 256 steps off the pixels' own (a 96x96 resize of CIFAR images kept 99.995 % of its values below 0.985
    of the top; the FX variants' output SQNR rose 0.4-1.2 dB with the whole range). For raw (0-255) and unit (0-1)
    pixels the scale is then the pixel step and the input is quantized exactly. Returns the observers' names."""
    from torch.ao.quantization.observer import ObserverBase

    modules = dict(prepared.named_modules())
    changed, frontier = [], [node for node in prepared.graph.nodes if node.op == "placeholder"]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(module, ObserverBase):
                if module.dtype in (torch.quint8, torch.qint8) and str(user.target) not in changed:
                    prepared.set_submodule(str(user.target), _whole_range(module))
                    changed.append(str(user.target))
            elif user.op in ("call_function", "call_method"):
                frontier.append(user)
    return changed


def _whole_range(observer):
    custom = ({"quant_min": observer.quant_min, "quant_max": observer.quant_max}
              if getattr(observer, "has_customized_qrange", False) else {})
    return _MinMaxObserver(dtype=observer.dtype, qscheme=observer.qscheme, reduce_range=observer.reduce_range,
                           **custom)
