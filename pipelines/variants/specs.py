"""The variant table: each variant name maps to one backend and one frozen config.

Adding a variant is one entry here; the sweep, the tracking and the reports need no change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ptqflow.common.errors import ConfigError
from ptqflow.models.backends.base import FloatModel, QuantizedModel
from ptqflow.models.backends.ort import OrtStaticConfig
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
from ptqflow.pipelines.shared.choices import VARIANT_NAMES

FP32 = "fp32"
PYTORCH = "pytorch"
ONNXRUNTIME = "onnxruntime"

_DTYPE_NAMES = {"qint8": "int8", "quint8": "uint8", "int8": "int8", "uint8": "uint8"}


# Cheapest first. int16: the layer's input activations in 16 bits (ONNX Runtime QDQ only); fp32: the layer in FP32
# (its weights and arithmetic; the activations around it stay 8-bit, quantized by the layers next to it); fp32+inputs:
# the layer and the layers producing its input in FP32, so that input is never quantized (both backends quantize a
# quantized layer's output whatever reads it, and a quantized reader quantizes a float input).
UPGRADE_KINDS = ("int16", "fp32", "fp32+inputs")


@dataclass(frozen=True)
class Upgrade:
    """One layer taken out of 8-bit quantization by the sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback)."""

    layer: str  # the ONNX node name, as the diagnosis table names the layer
    kind: str  # one of UPGRADE_KINDS
    tensors: tuple[str, ...] = ()  # int16: the activation tensors widened (the layer's inputs)
    inputs_from: tuple[str, ...] = ()  # fp32+inputs: the layers producing its input, FP32 with it

    def __post_init__(self):
        object.__setattr__(self, "tensors", tuple(self.tensors))  # JSON gives lists back
        object.__setattr__(self, "inputs_from", tuple(self.inputs_from))
        if self.kind not in UPGRADE_KINDS:
            raise ValueError(f"upgrade kind must be one of {UPGRADE_KINDS}, got {self.kind!r}")
        if (self.kind == "int16") != bool(self.tensors):
            raise ValueError(f"a 16-bit upgrade of {self.layer} names the activation tensors it widens; others none")
        if (self.kind == "fp32+inputs") != bool(self.inputs_from):
            raise ValueError(f"an fp32+inputs upgrade of {self.layer} names the layers producing its input; "
                             "others none")

    @property
    def fp32_layers(self) -> tuple[str, ...]:
        return (self.layer, *self.inputs_from) if self.kind != "int16" else ()

    @property
    def label(self) -> str:
        """e.g. `conv1:int16(x)`, `add:int16(a+b)`, `conv2:fp32`, `conv2:fp32+inputs(conv1)`."""
        detail = "+".join(self.tensors if self.kind == "int16" else self.inputs_from)
        return f"{self.layer}:{self.kind}" + (f"({detail})" if detail else "")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, **({"tensors": list(self.tensors)} if self.tensors else {}),
                **({"inputs_from": list(self.inputs_from)} if self.inputs_from else {})}


@dataclass(frozen=True)
class Mixed:
    """What makes a `<variant>-mixed` spec: the variant it repairs, the layers it upgraded (in the order the search
    added them) and the target it aimed at."""

    of: str
    upgrades: tuple[Upgrade, ...]
    target: str  # e.g. "top-1 agreement >= 99.50%"
    reached: bool  # on the full test set, when the search measured it

    def to_dict(self) -> dict:
        return {"of": self.of, "target": self.target, "reached": self.reached,
                "layers": [u.to_dict() for u in self.upgrades]}


def apply_upgrades(config: PytorchFxConfig | OrtStaticConfig, upgrades) -> PytorchFxConfig | OrtStaticConfig:
    """`config` with `upgrades` on top of the layers it already keeps in FP32 or 16 bits (a new config; the original
    is left as it is). FX has FP32 only (`fp32_modules`); ONNX Runtime has `fp32_nodes`, and for QDQ
    `activation_16bit_tensors`."""
    fp32 = tuple(name for u in upgrades for name in u.fp32_layers)
    wide = tuple(name for u in upgrades if u.kind == "int16" for name in u.tensors)
    if isinstance(config, PytorchFxConfig):
        if wide:
            raise ValueError("PyTorch FX variants have no 16-bit activations; upgrade to fp32")
        return replace(config, fp32_modules=tuple(dict.fromkeys(config.fp32_modules + fp32)))
    return replace(config, fp32_nodes=tuple(dict.fromkeys(config.fp32_nodes + fp32)),
                   activation_16bit_tensors=tuple(dict.fromkeys(config.activation_16bit_tensors + wide)))


def upgrade_kinds(config: PytorchFxConfig | OrtStaticConfig) -> tuple[str, ...]:
    """The kinds of upgrade a backend config has, cheapest first: 16-bit activations only for ONNX Runtime QDQ
    (QOperator kernels and FX's fbgemm/x86 take 8-bit activations only)."""
    if isinstance(config, OrtStaticConfig) and config.quant_format == "QDQ":
        return UPGRADE_KINDS
    return ("fp32", "fp32+inputs")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    framework: str
    config: PytorchFxConfig | OrtStaticConfig
    mixed: Mixed | None = None  # set on a `<variant>-mixed` spec made by the fallback search

    @property
    def keeps_layers_out_of_8_bits(self) -> bool:
        """A `-mixed` spec, or any config that keeps chosen layers in FP32 or 16 bits (a tune trial's upgrades):
        not a fully quantized variant, so never registered under the int8 names."""
        return self.mixed is not None or any(getattr(self.config, field, ()) for field in
                                             ("fp32_modules", "fp32_nodes", "activation_16bit_tensors"))

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
            from ptqflow.models.backends import pytorch_fx as backend
        else:
            from ptqflow.models.backends import ort as backend
        return backend.quantize(float_model, self.config, calibration, out_dir, advance)


def config_payload(config: PytorchFxConfig | OrtStaticConfig) -> dict:
    """A backend config in full, with its type: what qconfig.json holds and what the resume key hashes."""
    payload = asdict(config)
    payload["type"] = type(config).__name__
    return payload


def qconfig_document(spec: VariantSpec) -> dict:
    """A variant run's qconfig.json: the variant, its framework and backend, its config in full and, for a
    `-mixed` variant, which layers the fallback upgraded and why (`fallback`)."""
    document = {"variant": spec.name, "framework": spec.framework, "backend": spec.config.backend,
                "config": config_payload(spec.config)}
    if spec.mixed is not None:
        document["fallback"] = spec.mixed.to_dict()
    return document


VARIANTS: dict[str, VariantSpec] = {spec.name: spec for spec in (
    VariantSpec("pytorch-fx-int8", PYTORCH, PytorchFxConfig(backend="fbgemm")),
    VariantSpec("pytorch-fx-int8-x86", PYTORCH, PytorchFxConfig(backend="x86")),
    # oneDNN's engine with its own pattern config: each convolution fused with the residual Add (and ReLU) after it,
    # which fbgemm and x86 run as a separate quantized add. ResNet8: 3.1x FP32 at batch 256 against x86's 2.5x,
    # 98.95 % agreement against 98.58 % (one rounding of the block's output instead of two).
    VariantSpec("pytorch-fx-int8-onednn", PYTORCH, PytorchFxConfig(backend="onednn")),
    # QDQ with int8 weights. Activations are uint8, the type onnxruntime's x86 int8 kernels take: with int8
    # activations its runtime rewrite to uint8 (QDQS8ToU8Transformer) skips every Q/DQ pair a residual branch
    # shares, so 6 of ResNet8's 9 convs ran in float between Q/DQ (0.45-0.6x FP32 throughput, issue 13); uint8
    # activations fuse all 9 into QLinearConv (about 2x FP32) at the same or better agreement.
    VariantSpec("ort-int8", ONNXRUNTIME, OrtStaticConfig(quant_format="QDQ", activation_dtype="uint8",
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
assert DEFAULT_VARIANTS == VARIANT_NAMES, "pipelines/shared/choices.py lists the variant names for the CLI"


def select(names: tuple[str, ...] | list[str], ort_per_channel: bool | None = None,
           ort_calibration_method: str | None = None, weight_rounding: str | None = None,
           equalization: bool | None = None, speed_check: bool = True) -> list[VariantSpec]:
    """The specs for `names`, with the CLI's ORT, rounding, equalization and speed-check overrides applied; unknown
    names are a ConfigError."""
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
        if equalization is not None:
            spec = replace(spec, config=replace(spec.config, equalization=equalization))
        if not speed_check:  # every layer the backend can quantize in int8, however slow its kernel is here
            spec = replace(spec, config=replace(spec.config, speed_check=False))
        if spec.config.weight_rounding == "adaround" and spec.config.adaround_scheme is None:
            # No AdaRound grid matches this backend's weight scheme, so the quantizer rounds: record what runs.
            spec = replace(spec, config=replace(spec.config, weight_rounding="nearest"))
        specs.append(spec)
    return specs
