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


def engine_departures(graphs, images: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Module name -> share of its outputs more than DEPARTURE_STEPS quantization steps away from the reference
    lowering, for the quantized Conv/Linear modules of `graphs.converted` (ptqflow.models.backends.pytorch_fx.FxGraphs)
    where that share exceeds DEPARTED_SHARE, on the first `batch_size` model-ready `images`. Run under the engine
    the graphs were made for."""
    import torch
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dict(convert_to_reference_fx(copy.deepcopy(graphs.prepared),
                                                 backend_config=graphs.backend_config).named_modules())
    seen: dict[str, tuple] = {}
    hooks = [module.register_forward_hook(lambda _, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, module in graphs.converted.named_modules()
             if hasattr(module, "weight") and callable(module.weight) and name in reference]
    try:
        with torch.no_grad():
            graphs.converted(torch.from_numpy(np.ascontiguousarray(images[:batch_size])))
    finally:
        for hook in hooks:
            hook.remove()
    departed = {}
    for name, (quantized_in, quantized_out) in seen.items():
        if not (getattr(quantized_in, "is_quantized", False) and getattr(quantized_out, "is_quantized", False)):
            continue
        with torch.no_grad():
            expected = reference[name](quantized_in.dequantize())
        expected = torch.quantize_per_tensor(expected, quantized_out.q_scale(), quantized_out.q_zero_point(),
                                             quantized_out.dtype)
        steps = (expected.int_repr().int() - quantized_out.int_repr().int()).abs()
        share = float((steps > DEPARTURE_STEPS).float().mean())
        if share > DEPARTED_SHARE:
            departed[name] = share
    return departed


def describe_departures(departed: dict[str, float]) -> str:
    """One line for a run's tag: each departing layer with the share of its outputs off."""
    return "; ".join(f"{name}: {100 * share:.2f}% of outputs off by more than {DEPARTURE_STEPS} step"
                     for name, share in sorted(departed.items(), key=lambda item: -item[1]))
