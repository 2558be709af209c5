"""HardSwish and HardSigmoid in whatever form an exporter writes them, made the one torch module FX quantizes as a
single op (``quantized::hardswish``, ``quantized::hardsigmoid``) instead of an add, a clip and one or two multiplies,
each quantized with a scale of its own.

The forms recognized (``relu6(y)`` is ONNX Clip(0, 6), which onnx2torch makes an ``nn.ReLU6``):

* ONNX HardSigmoid with HardSwish's constants (alpha 1/6, beta 0.5): how torch's exporter writes
  ``hardsigmoid`` at any opset, and ``hardswish`` below opset 14 as ``x * HardSigmoid(x)``;
* ``relu6(x + 3) * (1/6)`` or ``relu6(x + 3) / 6``: Keras MobileNetV3's ``hard_sigmoid``, which tf2onnx and
  TFLite converters keep as Add, Clip and Mul;
* ``x * hard_sigmoid(x)`` in any of those forms: Keras's ``hard_swish``;
* ``(x * relu6(x + 3)) / 6`` or ``* (1/6)``: the hand-written HardSwish of many PyTorch MobileNetV3 ports.

Each rewrite is exact in float: ``nn.Hardsigmoid(x)`` is ``relu6(x + 3) / 6``.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch.fx as fx
from torch import nn

from ptqflow.models.graph.fx_modules import clip_range
from ptqflow.models.graph.fx_nodes import add_module, module_calls, module_of, scalar

try:  # onnx2torch is optional at import time
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    import_onnx2torch()
    from onnx2torch.node_converters import OnnxHardSigmoid
except ImportError:  # pragma: no cover
    OnnxHardSigmoid = ()  # type: ignore

__all__ = ["hard_activations"]


def hard_activations(gm: fx.GraphModule) -> None:
    """Rewrite every recognized HardSigmoid, then every HardSwish, of `gm` in place (dead nodes are left for the
    caller's dead-code pass)."""
    # New modules are named after the module they stand for (onnx2torch names those after the ONNX nodes).
    for node, m in module_calls(gm):
        if _is_onnx_hard_sigmoid(m):
            _replace(gm, node, nn.Hardsigmoid(), node.args[0], f"{node.target}_hardsigmoid")
    for node in list(gm.graph.nodes):
        found = _decomposed_hard_sigmoid(gm, node)
        if found is not None:
            _replace(gm, node, nn.Hardsigmoid(), found[0], f"{found[1].target}_hardsigmoid")
    for node in list(gm.graph.nodes):
        found = _gated_by_own_hard_sigmoid(gm, node) or _decomposed_hard_swish(gm, node)
        if found is not None:
            _replace(gm, node, nn.Hardswish(), found[0], f"{found[1].target}_hardswish")


def _is_onnx_hard_sigmoid(m: nn.Module) -> bool:
    """ONNX HardSigmoid with the constants of HardSwish's gate: clip(x / 6 + 0.5, 0, 1), exactly relu6(x + 3) / 6."""
    return bool(OnnxHardSigmoid) and isinstance(m, OnnxHardSigmoid) and math.isclose(m.alpha, 1 / 6, rel_tol=1e-6) \
        and math.isclose(m.beta, 0.5, rel_tol=1e-6)


def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, x: fx.Node, name: str) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(add_module(gm, name, module), (x,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _operands(node, op, both_orders: bool = True) -> list[tuple]:
    """The operand pairs of a call of `op` (operator.add, mul, truediv): (a, b), and (b, a) when `both_orders`;
    none for any other node."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is op and len(node.args) == 2
            and not node.kwargs):
        return []
    a, b = node.args
    return [(a, b), (b, a)] if both_orders else [(a, b)]


def _is_close(value: Optional[float], expected: float) -> bool:
    return value is not None and math.isclose(value, expected, rel_tol=1e-6)


def _sixth_of(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """y when `node` is y * (1/6), (1/6) * y or y / 6."""
    for y, c in _operands(node, operator.mul):
        if isinstance(y, fx.Node) and _is_close(scalar(gm, c), 1 / 6):
            return y
    for y, c in _operands(node, operator.truediv, both_orders=False):
        if isinstance(y, fx.Node) and _is_close(scalar(gm, c), 6.0):
            return y
    return None


def _relu6_of_x_plus_3(gm: fx.GraphModule, node) -> Optional[fx.Node]:
    """x when `node` is relu6(x + 3) (or relu6(3 + x))."""
    if not isinstance(node, fx.Node) or clip_range(module_of(gm, node)) != (0.0, 6.0) or len(node.args) != 1:
        return None
    for x, c in _operands(node.args[0], operator.add):
        if isinstance(x, fx.Node) and _is_close(scalar(gm, c), 3.0):
            return x
    return None


# Each matcher returns (x, the clip or gate node whose module names the new one), or None.
Found = Optional[tuple[fx.Node, fx.Node]]


def _decomposed_hard_sigmoid(gm: fx.GraphModule, node: fx.Node) -> Found:
    """relu6(x + 3) * (1/6) or relu6(x + 3) / 6."""
    clip = _sixth_of(gm, node)
    x = _relu6_of_x_plus_3(gm, clip) if clip is not None else None
    return (x, clip) if x is not None else None


def _gated_by_own_hard_sigmoid(gm: fx.GraphModule, node: fx.Node) -> Found:
    """x * Hardsigmoid(x) (either order)."""
    for x, gate in _operands(node, operator.mul):
        if isinstance(module_of(gm, gate), nn.Hardsigmoid) and gate.args == (x,):
            return x, gate
    return None


def _decomposed_hard_swish(gm: fx.GraphModule, node: fx.Node) -> Found:
    """(x * relu6(x + 3)) / 6 or * (1/6)."""
    for x, clip in _operands(_sixth_of(gm, node), operator.mul):
        if isinstance(x, fx.Node) and _relu6_of_x_plus_3(gm, clip) is x:
            return x, clip
    return None
