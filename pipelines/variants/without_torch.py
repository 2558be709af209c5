"""A model onnx2torch cannot convert (an op it has no converter for) still gets its ONNX Runtime variants: the PyTorch
variants start from onnx2torch's module and are unsupported, with onnx2torch's reason, and AdaRound, which fits
each layer's rounding on that module, gives way to nearest rounding, said in the rounding choice. Before, the whole
sweep stopped at the FP32 conversion."""

from __future__ import annotations

from dataclasses import replace

from ptqflow.common.errors import ModelError
from ptqflow.models.backends.base import FloatModel, UnsupportedVariant
from ptqflow.pipelines.variants.rounding_choice import ADAROUND, NEAREST, RoundingChoice
from ptqflow.pipelines.variants.specs import PYTORCH, VariantSpec


def conversion_error(float_model: FloatModel) -> str | None:
    """None when onnx2torch converts `float_model` (its module is then made), else why not, in one line."""
    try:
        float_model.prepare(torch=True, onnxruntime=False)
    except ModelError as exc:
        return str(exc)
    return None


def spec_without_torch(spec: VariantSpec, error: str) -> tuple[VariantSpec, RoundingChoice | None]:
    """`spec` as it can run without onnx2torch's module, and the rounding choice that says AdaRound gave way.
    Raises UnsupportedVariant for a PyTorch variant."""
    if spec.framework == PYTORCH:
        raise UnsupportedVariant(f"{error} (the PyTorch variants start from onnx2torch's module)")
    if spec.config.weight_rounding != ADAROUND:
        return spec, None
    choice = RoundingChoice(NEAREST, 0, {}, {}, reason=f"nearest rounding: AdaRound fits each layer on onnx2torch's "
                                                       f"module, and {error}")
    return replace(spec, config=replace(spec.config, weight_rounding=NEAREST)), choice
