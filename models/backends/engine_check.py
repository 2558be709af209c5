"""Does the int8 engine compute what was quantized? Each quantized Conv/Linear module of a converted FX model is run
by the engine (fbgemm or onednn kernels) and by torch's reference lowering of the same module (dequantize, the
float op on the dequantized weights, quantize with the engine's output scale), on the inputs the int8 model gives
it. Kernels round differently by at most a step; a layer whose outputs depart by more, on more than a few
elements, was computed wrongly by the engine (fbgemm's depthwise kernels saturate 16-bit pair sums on 8-bit
activations)."""

from __future__ import annotations

import copy
import warnings

import numpy as np

DEPARTURE_STEPS = 1  # kernels may round a value to the neighbouring step
DEPARTED_SHARE = 1e-3  # a layer with more of its outputs further off than that departs


CHECKED_IMAGES = 64  # calibration images the check runs: a model with its batch fixed at 1 runs them one by one


def departures(shares: dict[str, float], min_share: float = DEPARTED_SHARE) -> dict[str, float]:
    """The layers of `shares` (engine_shares) whose share exceeds `min_share`: those the engine computed wrongly."""
    return {name: share for name, share in shares.items() if share > min_share}


def engine_shares(graphs, images: np.ndarray, batch_size: int = CHECKED_IMAGES) -> dict[str, float]:
    """Module name -> share of its outputs more than DEPARTURE_STEPS quantization steps away from the reference
    lowering, for each quantized Conv/Linear module of `graphs.converted` (ptqflow.models.backends.pytorch_fx.FxGraphs),
    on the first CHECKED_IMAGES model-ready `images` in batches of `batch_size` (a fixed batch of one ran on a single
    image before, where a rare saturation goes unseen). Run under the engine the graphs were made for."""
    import torch
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dict(convert_to_reference_fx(copy.deepcopy(graphs.prepared),
                                                 backend_config=graphs.backend_config).named_modules())
    inputs: dict[str, tuple] = {}
    counts: dict[str, list[int]] = {}  # name -> [outputs further off than DEPARTURE_STEPS, outputs]

    def compare(name: str, quantized_in: tuple, quantized_out) -> None:
        if not all(getattr(t, "is_quantized", False) for t in (*quantized_in, quantized_out)):
            return
        with torch.no_grad():
            expected = reference[name](*(t.dequantize() for t in quantized_in))
        expected = torch.quantize_per_tensor(expected, quantized_out.q_scale(), quantized_out.q_zero_point(),
                                             quantized_out.dtype)
        steps = (expected.int_repr().int() - quantized_out.int_repr().int()).abs()
        count = counts.setdefault(name, [0, 0])
        count[0] += int((steps > DEPARTURE_STEPS).sum())
        count[1] += steps.numel()

    # every input (onednn's fused conv + residual Add takes the residual as a second one) copied before the module
    # runs: that fused op writes its sum into the residual's buffer
    watched = [(name, module) for name, module in graphs.converted.named_modules()
               if hasattr(module, "weight") and callable(module.weight) and name in reference]
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, _copied(args)))
             for name, module in watched]
    hooks += [module.register_forward_hook(lambda _, args, out, name=name: compare(name, inputs[name], out))
              for name, module in watched]
    try:
        with torch.no_grad():
            checked = np.ascontiguousarray(images[:max(CHECKED_IMAGES // batch_size, 1) * batch_size])
            for start in range(0, len(checked), batch_size):
                graphs.converted(torch.from_numpy(checked[start:start + batch_size]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: far / total for name, (far, total) in counts.items() if total}


def engine_departures(graphs, images: np.ndarray, batch_size: int = CHECKED_IMAGES) -> dict[str, float]:
    """The layers engine_shares finds computed wrongly: more than DEPARTED_SHARE of their outputs off."""
    return departures(engine_shares(graphs, images, batch_size))


def _copied(args: tuple) -> tuple:
    return tuple(a.clone() if hasattr(a, "clone") else a for a in args)


def overwritten_residuals(converted) -> list[str]:
    """The fused conv + Add modules of a converted FX graph (onednn's ConvAdd2d, ConvAddReLU2d) whose residual input
    another node reads after them: the oneDNN kernel writes its sum into the residual's buffer, so that reader would
    get the sum instead. Empty when every residual's other readers run before the fused op (or there are none)."""
    from torch.ao.nn.intrinsic.quantized import ConvAdd2d, ConvAddReLU2d

    order = {node: index for index, node in enumerate(converted.graph.nodes)}
    modules = dict(converted.named_modules())
    overwritten = []
    for node in converted.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (ConvAdd2d, ConvAddReLU2d)):
            continue
        residual = node.args[1] if len(node.args) > 1 else None
        if residual is not None and any(order[user] > order[node] for user in residual.users if user is not node):
            overwritten.append(str(node.target))
    return overwritten


def describe_departures(departed: dict[str, float]) -> str:
    """One line for a run's tag: each departing layer with the share of its outputs off."""
    return "; ".join(f"{name}: {100 * share:.2f}% of outputs off by more than {DEPARTURE_STEPS} step"
                     for name, share in sorted(departed.items(), key=lambda item: -item[1]))
