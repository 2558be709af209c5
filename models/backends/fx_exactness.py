"""Depthwise layers fbgemm cannot compute exactly stay in FP32. fbgemm's depthwise kernels multiply uint8 inputs by
int8 weights in pairs summed to 16 bits, which saturate once 255 * |w1| + 255 * |w2| exceeds 32767: on 8-bit inputs
a few outputs come out up to 242 steps off (engine_check). Seven-bit inputs to every depthwise layer prevent it and
cost every one of them half its input resolution; the default instead quantizes with 8-bit inputs once, runs the
engine check on the calibration images, and keeps in FP32 (exact) the depthwise layers whose outputs departed. Over
three calibration seeds, on the full test sets, that raised fbgemm's output SQNR over seven-bit inputs by about 1 dB
on MobileNetV1/V2-style fixtures and 2.5 dB on a VWW-shaped MobileNetV1 0.25 (agreement 98.46-98.60 % -> 98.68-98.84
%), at the cost of those layers' int8 speed-up (depthwise layers hold a few percent of a MobileNet's MACs)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from typing import Callable

import numpy as np

from ptqflow.common.files import array_sha256, update_with_tensors

SATURATION_POLICIES = ("float", "seven-bit", "allowed")
SATURATION_SUMMARIES = {"float": "FP32 where fbgemm saturates", "seven-bit": "7-bit depthwise inputs",
                        "allowed": "8-bit depthwise inputs (fbgemm may saturate)"}

# inexact_layers' findings by model weights, calibration images and recipe: the sweep's MAC share, the variant and
# its diagnosis ask for the same model
_FOUND: dict[str, dict[str, str]] = {}


def inexact_layers(float_model, config, calibration: np.ndarray, quantize: Callable) -> dict[str, str]:
    """The depthwise convolutions (FX module names) of `float_model` that fbgemm computes away from their
    quantization on the `calibration` images when their inputs are 8-bit, each with why; empty unless `config` is
    fbgemm's with fbgemm_saturation "float" (and graph preparation, qint8 weights) and the model has depthwise
    layers. Quantizes once with `quantize` (pytorch_fx.quantize_graphs) and fbgemm_saturation "allowed" to find
    them."""
    if (config.backend != "fbgemm" or config.fbgemm_saturation != "float" or not config.graph_preparation
            or config.weight_dtype != "qint8"):
        return {}
    from ptqflow.models.graph.fx_modules import is_depthwise

    if not any(is_depthwise(module) for module in float_model.torch_module.modules()):
        return {}
    key = _key(float_model, config, calibration)
    if key not in _FOUND:
        _FOUND[key] = _found(float_model, config, calibration, quantize)
    return dict(_FOUND[key])


def _found(float_model, config, calibration: np.ndarray, quantize: Callable) -> dict[str, str]:
    from ptqflow.models.backends.engine_check import departures
    from ptqflow.models.graph.fx_modules import is_depthwise

    probe = quantize(float_model, replace(config, fbgemm_saturation="allowed"), calibration)
    # every share, however small: the engine check's own threshold is for what it reports
    departed = departures(probe.engine_shares, min_share=0.0)
    modules = dict(probe.source.named_modules())
    return {name: (f"fbgemm's int8 kernel saturates here: {100 * share:.3g}% of its outputs off on 8-bit inputs "
                   "(calibration images); FP32 is exact")
            for name, share in departed.items() if name in modules and is_depthwise(modules[name])}


def _key(float_model, config, calibration: np.ndarray) -> str:
    digest = hashlib.sha256(repr(sorted(asdict(config).items())).encode())
    update_with_tensors(digest, float_model.torch_module.state_dict().items())
    digest.update(f"\0{array_sha256(calibration)}".encode())
    return digest.hexdigest()
