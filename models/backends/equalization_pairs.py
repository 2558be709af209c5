"""Which Conv -> activation -> Conv pairs of an ONNX graph cross-layer equalization may rescale, and how.

A pair is two convolutions joined by one activation that nothing else reads. Each side is a plain convolution
(group 1) or a depthwise one (one input channel per group, as many output channels as input channels): for a
depthwise convolution, input channel i and output channel i are the same filter, so scaling that filter rescales
both, and a MobileNet's pointwise -> depthwise -> pointwise chain is two pairs sharing the depthwise layer.

The activation decides which scales keep the model's function:
- Relu, LeakyRelu and a Clip with lower bound 0 and no upper bound are positively homogeneous (f(x / s) = f(x) / s
  for s > 0): any positive scale is exact.
- Clip(0, b), ReLU6 as ONNX exporters write it, is not: a channel divided by s is clipped at b, which is b * s in the
  original units. Such a pair carries its bound, and the scales are kept on the calibration data's side of it
  (equalization.py): a channel the bound clips there keeps scale 1, and any other channel's scale is held where its
  calibration maximum stays clear of the bound, so the clip changes nothing the calibration images reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ptqflow.models.graph.layer_map import readers_of
from ptqflow.models.graph.rewrites import clip_bounds

__all__ = ["Pair", "equalizable_pairs", "conv_kind"]

_HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclass(frozen=True)
class Pair:
    """Two convolutions equalization rescales together: `first`'s output channel i by 1/s_i, `second`'s input
    channel i by s_i. `bound`: the upper bound of a Clip(0, bound) between them (None when the activation is
    positively homogeneous); `bounded_tensor`: the tensor whose per-channel maxima the bound is checked against
    (`first`'s output, before the clip)."""

    first: onnx.NodeProto
    second: onnx.NodeProto
    activation: str
    bound: float | None = None

    @property
    def names(self) -> tuple[str, str]:
        return node_name(self.first), node_name(self.second)

    @property
    def bounded_tensor(self) -> str:
        return self.first.output[0]


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def conv_kind(node: onnx.NodeProto, weight: onnx.TensorProto | None) -> str | None:
    """"plain" (group 1), "depthwise" (one input and one output channel per group), or None (another grouping, or
    not a standard Conv)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    group = _attribute(node, "group", 1)
    if group == 1:
        return "plain"
    if weight is not None and len(weight.dims) >= 2 and weight.dims[0] == group and weight.dims[1] == 1:
        return "depthwise"
    return None


def _activation(node: onnx.NodeProto, initializers: dict) -> tuple[bool, float | None, str]:
    """(equalizable, bound, reason when not) of the activation between two convolutions."""
    if node.op_type in _HOMOGENEOUS:
        return True, None, ""
    if node.op_type != "Clip":
        return False, None, f"{node.op_type} is not positively homogeneous"
    bounds = clip_bounds(node, initializers)
    if bounds is None:
        return False, None, "the Clip's bounds are computed, not constants"
    lower, upper = bounds
    if lower is None or lower != 0.0:
        return False, None, "a Clip whose lower bound is not 0 does not commute with scaling"
    if upper is None or not np.isfinite(upper):
        return True, None, ""
    return (True, float(upper), "") if upper > 0 else (False, None, "a Clip with upper bound <= 0")


def equalizable_pairs(model: onnx.ModelProto) -> tuple[list[Pair], list[tuple[str, str]]]:
    """(pairs, skipped): the Conv -> activation -> Conv pairs of the main graph equalization may rescale, and why the
    other candidates (a Conv whose only reader is an activation feeding a Conv) cannot be. A pair qualifies when
    both convolutions are plain or depthwise with float initializer weights (and bias) of matching channel counts,
    the first's output is read by the activation alone and the activation's output by the second Conv alone (as its
    data input), and neither is a graph output."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = readers_of(graph)
    outputs = {value.name for value in graph.output}
    pairs, skipped = [], []
    for conv1 in graph.node:
        if conv1.op_type != "Conv" or not conv1.output or conv1.output[0] in outputs:
            continue
        readers = consumers.get(conv1.output[0], [])
        if len(readers) != 1 or readers[0].op_type not in (*_HOMOGENEOUS, "Clip"):
            continue
        activation = readers[0]
        after = consumers.get(activation.output[0], [])
        if not any(n.op_type == "Conv" for n in after):
            continue
        name = node_name(conv1)
        if len(after) != 1 or activation.output[0] in outputs:
            skipped.append((name, f"{activation.output[0]} is read by {len(after)} nodes"
                                  f"{' and is a graph output' if activation.output[0] in outputs else ''}; "
                                  "equalizing would change the others' inputs"))
            continue
        conv2 = after[0]
        if conv2.op_type != "Conv" or conv2.input[0] != activation.output[0]:
            continue
        reason = _weights_problem(conv1, conv2, initializers)
        if reason:
            skipped.append((name, reason))
            continue
        equalizable, bound, why = _activation(activation, initializers)
        if not equalizable:
            skipped.append((name, why))
            continue
        pairs.append(Pair(conv1, conv2, activation.op_type, bound))
    return pairs, skipped


def _weights_problem(conv1: onnx.NodeProto, conv2: onnx.NodeProto, initializers: dict) -> str:
    """Why the two convolutions' weights cannot be rescaled, or "" when they can."""
    w1, w2 = initializers.get(conv1.input[1]), initializers.get(conv2.input[1])
    has_bias = len(conv1.input) > 2 and bool(conv1.input[2])
    b1 = initializers.get(conv1.input[2]) if has_bias else None
    if w1 is None or w2 is None or (has_bias and b1 is None):
        return "weights or bias are computed, not initializers"
    if conv_kind(conv1, w1) is None or conv_kind(conv2, w2) is None:
        return "a grouped convolution that is neither plain nor depthwise"
    if any(t.data_type != onnx.TensorProto.FLOAT for t in (w1, w2) + ((b1,) if b1 is not None else ())):
        return "weights are not float32"
    second_inputs = w2.dims[0] if conv_kind(conv2, w2) == "depthwise" else w2.dims[1]
    if w1.dims[0] != second_inputs:
        return "channel counts differ"
    return ""
