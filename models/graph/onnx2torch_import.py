"""Import onnx2torch without importing torchvision until a converted model needs it.

onnx2torch imports every node converter at import time, and two of them (NonMaxSuppression, RoiAlign) import
torchvision, whose `ops` import torch._dynamo: about 2 s of every process that converts a model, though an image
classifier has neither node. While onnx2torch is imported, `torchvision` and `torchvision.ops` are stand-ins whose
functions import the real torchvision on their first call; the stand-ins are then taken out of `sys.modules`, so
any later `import torchvision` gets the real one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _deferred(module: str, name: str):
    """A function that calls `module.name`, importing `module` on its first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class _StandIn(types.ModuleType):
    """What `import torchvision` / `from torchvision.ops import x` see while onnx2torch is imported: an attribute is
    the stand-in of a submodule set on it, else a deferred function of the real module."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _deferred(self.__name__, name)


def import_onnx2torch() -> types.ModuleType:
    """The onnx2torch module, imported with torchvision deferred (see the module docstring), with the opset-18
    reduction converters it lacks (ptqflow.models.graph.onnx2torch_opset18) and converters for newer op versions
    and GlobalMaxPool (onnx2torch_newer_opsets). When torchvision is already imported,
    or not installed (then onnx2torch's own import error says so), it is a plain import."""
    from ptqflow.models.graph import onnx2torch_newer_opsets, onnx2torch_opset18

    module = _imported()
    onnx2torch_opset18.register()
    onnx2torch_newer_opsets.register()  # after the opset-18 reductions, which it then maps newer versions to
    return module


def _imported() -> types.ModuleType:
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return importlib.import_module("onnx2torch")
    package, ops = _StandIn("torchvision"), _StandIn("torchvision.ops")
    package.__path__ = []  # a package, so `torchvision.ops` can be imported from it
    package.ops = ops
    stand_ins = {"torchvision": package, "torchvision.ops": ops}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def convert(proto):
    """onnx2torch's torch.fx.GraphModule of the ONNX model `proto`, after the function-preserving rewrites its
    converters need: weights fed by Constant/Identity nodes become initializers (it reads weights from initializers
    only), auto_pad becomes the pads it means, asymmetric average pools a Pad before a symmetric pool, and Reshape's
    allowzero=1 goes where no 0 can reach it (it implements none of these)."""
    from ptqflow.models.graph.rewrites import (explicit_pads, materialize_constants, reshapes_without_allowzero,
                                               symmetric_average_pools)

    proto = explicit_pads(materialize_constants(proto)[0])[0]
    proto = reshapes_without_allowzero(symmetric_average_pools(proto)[0])[0]
    return import_onnx2torch().convert(proto)
