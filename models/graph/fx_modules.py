"""What kind of layer an FX module is, read the same way by the quantization recipe (ptqflow.models.backends.fx_qconfig)
and AdaRound's bias correction (ptqflow.models.adaround.bias_correction): depthwise convolutions, and the range a
ReLU or a clip with constant bounds passes on."""
from __future__ import annotations

import math

from torch import nn

CLIPS = (nn.ReLU6, nn.Hardtanh)  # onnx2torch's Clip(0, 6) is nn.ReLU6; other constant ranges are OnnxClip


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every filter reads one input channel of its own."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups == module.in_channels


def clip_range(module) -> tuple[float, float] | None:
    """The constant (low, high) a clip module keeps its input to, or None."""
    if isinstance(module, CLIPS):
        return float(module.min_val), float(module.max_val)
    low, high = getattr(module, "min_val", None), getattr(module, "max_val", None)
    if type(module).__name__ == "OnnxClip" and isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return float(low), float(high)
    return None


def _sole_readers(gm, relu: bool):
    """(module, reader, range passed on) for each call_module node of FX graph `gm` whose output only a clip (and,
    with `relu`, a ReLU: (0, inf)) module reads."""
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module":
            continue
        reader = gm.get_submodule(user.target)
        passed = (0.0, math.inf) if relu and isinstance(reader, nn.ReLU) else clip_range(reader)
        if passed is not None:
            yield node.target, user.target, passed


def sole_readers(gm, names, relu: bool = True) -> list[str]:
    """The clip modules (and, with `relu`, ReLU modules) of FX graph `gm` that alone read the output of a module in
    `names`: a float convolution's activation, which stays float with it."""
    return [reader for module, reader, _ in _sole_readers(gm, relu) if module in names]


def sole_reader_ranges(gm, relu: bool = False) -> dict[str, tuple[float, float]]:
    """Module name -> the (low, high) that the clip (and, with `relu`, the ReLU: (0, inf)) which alone reads the
    module's output passes on unchanged, for the modules of FX graph `gm` whose output only such a module reads."""
    return {module: passed for module, _, passed in _sole_readers(gm, relu)}
