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
from torch.ao.quantization.observer import MinMaxObserver as _MinMaxObserver

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


class PercentileObserver(_MinMaxObserver):
    """Activation observer: range = average over calibration batches of the per-batch
    ``percentile`` (upper) / ``100 - percentile`` (lower) of the values (exact: ``kth_largest``);
    a range that includes 0 is kept (post-ReLU tensors get min 0).  Similar to
    onnxruntime's CalibrationMethod.Percentile; use equal-size calibration batches."""

    def __init__(self, percentile: float = 99.995, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.register_buffer("_n", torch.tensor(0.0))
        self.register_buffer("_lo", torch.tensor(0.0))
        self.register_buffer("_hi", torch.tensor(0.0))

    def forward(self, x_orig):
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        k = max(1, int(math.ceil((1.0 - self.percentile / 100.0) * x.numel())))
        hi = kth_largest(x, k)
        lo = -kth_largest(-x, k)
        n = self._n + 1
        self._hi.copy_(self._hi + (hi - self._hi) / n)
        self._lo.copy_(self._lo + (lo - self._lo) / n)
        self._n.copy_(n)
        self.min_val.copy_(torch.minimum(self._lo, torch.zeros_like(self._lo)))
        self.max_val.copy_(torch.maximum(self._hi, torch.zeros_like(self._hi)))
        return x_orig


def qconfig_mapping(
    backend: str = "x86",
    *,
    activation_observer: str = "percentile",
    weight_observer: str = "perchannel_minmax",
    reduce_range: bool = False,
    percentile: float = 99.995,
    keep_float: Sequence[Any] = (),
    float_modules: Sequence[str] = (),
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
    """
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
    )

    act = {
        "minmax": MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        "histogram": HistogramObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        "moving_minmax": MovingAverageMinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
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
    for name in float_modules:
        m.set_module_name(name, None)
    return m
