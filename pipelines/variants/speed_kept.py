"""The layers an FX variant's speed check keeps in float, known before the variant runs (its run records the share
of MACs it runs in int8 when it starts)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ptqflow.common.errors import ModelError
from ptqflow.models.backends.base import FloatModel
from ptqflow.pipelines.variants.specs import PYTORCH, VariantSpec


class SpeedKept:
    """spec -> the FX modules its speed check keeps in float (pytorch_fx.speed_kept_layers), found once per setting
    that shapes it; none for onnxruntime specs (their config's MAC share includes their check)."""

    def __init__(self, source: Callable[[], FloatModel], calibration: np.ndarray):
        self.source = source  # the FP32 model the variants quantize, once converted
        self.calibration = calibration
        self._found: dict[tuple, tuple[str, ...]] = {}

    def __call__(self, spec: VariantSpec) -> tuple[str, ...]:
        config = spec.config
        if spec.framework != PYTORCH or not getattr(config, "speed_check", False):
            return ()
        key = (config.backend, config.float_head, config.fp32_modules, config.graph_preparation, config.weight_dtype)
        if key not in self._found:
            from ptqflow.models.backends.pytorch_fx import speed_kept_layers

            try:
                kept = speed_kept_layers(self.source(), config, self.calibration)
            except ModelError:  # no onnx2torch module to time: the variant itself says so
                kept = {}
            self._found[key] = tuple(kept)
        return self._found[key]
