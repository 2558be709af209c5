"""Reading and extending an FX graph of an onnx2torch module: which module a node calls, the constant a node holds,
and new submodules under names of their own. Shared by the graph-preparation passes (fx_prep, fx_activations)."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

try:  # onnx2torch is optional at import time (graph preparation also works on plain torch modules)
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    import_onnx2torch()
    from onnx2torch.node_converters import OnnxConstant
except ImportError:  # pragma: no cover
    OnnxConstant = ()  # type: ignore

__all__ = ["module_of", "module_calls", "constant", "scalar", "add_module"]


def module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def module_calls(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, nn.Module]]:
    """(node, module) for every call_module node, over a snapshot of the graph so callers may rewrite it."""
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if m is not None:
            yield node, m


def constant(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """Value of a get_attr node (onnx2torch initializers) or of an ONNX Constant node's module, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj.detach()
    module = module_of(gm, node)
    if OnnxConstant and isinstance(module, OnnxConstant) and not node.args:
        return module.value.detach() if isinstance(module.value, torch.Tensor) else None
    return None


def scalar(gm: fx.GraphModule, arg: Any) -> Optional[float]:
    """`arg` as one number: a Python number, or a constant node holding a one-element floating tensor; else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    value = constant(gm, arg)
    if value is None or value.numel() != 1 or not value.is_floating_point():
        return None
    return float(value.reshape(()))


_counter = [0]


def add_module(gm: fx.GraphModule, base: str, mod: nn.Module) -> str:
    name = base.replace(".", "_").replace("/", "_")
    while hasattr(gm, name):
        _counter[0] += 1
        name = f"{base.replace('.', '_').replace('/', '_')}_{_counter[0]}"
    gm.add_submodule(name, mod)
    return name
