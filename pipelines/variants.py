"""The variant table: each variant name maps to one backend and one frozen config.

Adding a variant is one entry here; the sweep, the tracking and the reports need no change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from common.errors import ConfigError
from models.base import FloatModel, QuantizedModel
from models.quantize_ort import OrtStaticConfig
from models.quantize_pytorch import PytorchFxConfig
from pipelines.choices import VARIANT_NAMES

FP32 = "fp32"
PYTORCH = "pytorch"
ONNXRUNTIME = "onnxruntime"

_DTYPE_NAMES = {"qint8": "int8", "quint8": "uint8", "int8": "int8", "uint8": "uint8"}


@dataclass(frozen=True)
class VariantSpec:
    name: str
    framework: str
    config: PytorchFxConfig | OrtStaticConfig

    @property
    def weight_dtype(self) -> str:
        return _DTYPE_NAMES[self.config.weight_dtype]

    @property
    def activation_dtype(self) -> str:
        return _DTYPE_NAMES[self.config.activation_dtype]

    @property
    def quant_format(self) -> str:
        return self.config.quant_format

    @property
    def calibration_method(self) -> str:
        if isinstance(self.config, PytorchFxConfig):
            return f"{self.config.activation_observer}-observer"
        return self.config.calibration_method

    def quantize(self, float_model: FloatModel, calibration: np.ndarray, out_dir: Path,
                 advance: Callable[[int], None] = lambda n: None) -> QuantizedModel:
        if isinstance(self.config, PytorchFxConfig):
            from models import quantize_pytorch as backend
        else:
            from models import quantize_ort as backend
        return backend.quantize(float_model, self.config, calibration, out_dir, advance)


def config_payload(config: PytorchFxConfig | OrtStaticConfig) -> dict:
    """A backend config in full, with its type: what qconfig.json holds and what the resume key hashes."""
    payload = asdict(config)
    payload["type"] = type(config).__name__
    return payload


VARIANTS: dict[str, VariantSpec] = {spec.name: spec for spec in (
    VariantSpec("pytorch-fx-int8", PYTORCH, PytorchFxConfig(backend="fbgemm")),
    VariantSpec("pytorch-fx-int8-x86", PYTORCH, PytorchFxConfig(backend="x86")),
    VariantSpec("ort-int8", ONNXRUNTIME, OrtStaticConfig(quant_format="QDQ", activation_dtype="int8",
                                                         weight_dtype="int8", per_channel=True)),
    VariantSpec("ort-uint8", ONNXRUNTIME, OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8",
                                                          weight_dtype="uint8", per_channel=False)),
    # uint8 activations with int8 per-channel weights: the combination onnxruntime's x86 kernels run fastest.
    VariantSpec("ort-int8-u8s8", ONNXRUNTIME, OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8",
                                                              weight_dtype="int8", per_channel=True)),
    # fbgemm and x86 kernels take qint8 weights only: attempted so the refusal is on record, with its reason.
    VariantSpec("pytorch-fx-uint8", PYTORCH, PytorchFxConfig(backend="fbgemm", weight_dtype="quint8")),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)
assert DEFAULT_VARIANTS == VARIANT_NAMES, "pipelines/choices.py lists the variant names for the CLI"


def select(names: tuple[str, ...] | list[str], ort_per_channel: bool | None = None,
           ort_calibration_method: str | None = None, weight_rounding: str | None = None) -> list[VariantSpec]:
    """The specs for `names`, with the CLI's ORT overrides applied; unknown names are a ConfigError."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}")
    specs = []
    for name in dict.fromkeys(names):
        spec = VARIANTS[name]
        if isinstance(spec.config, OrtStaticConfig):
            overrides = {}
            if ort_per_channel is not None:
                overrides["per_channel"] = ort_per_channel
            if ort_calibration_method is not None:
                overrides["calibration_method"] = ort_calibration_method
                if ort_calibration_method != "Percentile":  # the percentile option would be recorded, not used
                    overrides["extra_options"] = tuple((k, v) for k, v in spec.config.extra_options
                                                       if k != "CalibPercentile")
            spec = replace(spec, config=replace(spec.config, **overrides))
        if weight_rounding is not None:
            spec = replace(spec, config=replace(spec.config, weight_rounding=weight_rounding))
        if spec.config.weight_rounding == "adaround" and spec.config.adaround_scheme is None:
            # No AdaRound grid matches this backend's weight scheme, so the quantizer rounds: record what runs.
            spec = replace(spec, config=replace(spec.config, weight_rounding="nearest"))
        specs.append(spec)
    return specs
