"""Empirical bias correction of a depthwise convolution once its weights are rounded: each output channel's mean
error over the calibration images (the rounded layer on the inputs the rounded model feeds it, against the FP32
layer on the FP32 model's) is taken off its bias. A depthwise filter has a handful of weights (nine for 3x3), too
few for any rounding to keep its channel's mean where it was, and ReLU6 passes a shifted mean on to every later
layer; a pointwise or dense layer sums hundreds of products, whose rounding errors cancel."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

UNBOUNDED = (-math.inf, math.inf)


@torch.no_grad()
def correct_bias(module: nn.Module, output: torch.Tensor, target: torch.Tensor,
                 passed: Tuple[float, float] = UNBOUNDED) -> int:
    """Take each channel's mean of `output - target` ([images, channels, ...]: the rounded layer's output and its
    FP32 target) off `module.bias`, counting only the values whose target the activation after the layer passes
    (`passed`: a clipped value's error goes nowhere, and a dead ReLU6 channel's large negative values would set the
    mean of the few that count). Only where that generalizes: the mean of either half of the images (even and odd
    rows) lowers the other half's squared error. Returns the number of channels corrected (0 without a bias)."""
    if module.bias is None or output.shape[0] < 2:
        return 0
    error = (output - target).double()
    counted = ((target > passed[0]) & (target < passed[1])).double()
    dims = [d for d in range(error.dim()) if d != 1]

    def mean(rows: slice) -> torch.Tensor:
        total, count = (error[rows] * counted[rows]).sum(dims), counted[rows].sum(dims)
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

    first, second = mean(slice(0, None, 2)), mean(slice(1, None, 2))
    # subtracting m from errors of mean e lowers their mean square by m * (2e - m)
    generalizes = (first * (2 * second - first) > 0) & (second * (2 * first - second) > 0)
    shift = torch.where(generalizes, mean(slice(None)), torch.zeros_like(first))
    module.bias.sub_(shift.to(module.bias.dtype))
    return int(generalizes.sum())


def corrected_bias_count(source, rounded) -> int:
    """Bias elements of the Conv nodes of ONNX model `rounded` that differ from `source`'s (same graph): the
    channels bias correction moved."""
    from onnx import numpy_helper

    before = {i.name: i for i in source.graph.initializer}
    biases = {node.input[2] for node in rounded.graph.node if node.op_type == "Conv" and len(node.input) > 2}
    count = 0
    for init in rounded.graph.initializer:
        if init.name in before and init.name in biases:
            old, new = numpy_helper.to_array(before[init.name]), numpy_helper.to_array(init)
            count += int((old != new).sum()) if old.shape == new.shape else 0
    return count

