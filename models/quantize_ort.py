"""ONNX Runtime static quantization (`quantize_static`) of the pre-processed FP32 model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from models.base import FloatModel, QuantizedModel, batches, write_atomic

MODEL_FILE_NAME = "model.onnx"
QUANT_FORMATS = ("QDQ", "QOperator")
DTYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


@dataclass(frozen=True)
class OrtStaticConfig:
    """One quantize_static recipe. Every field is logged as an MLflow param."""

    quant_format: str = "QDQ"  # QDQ (quantize/dequantize pairs) or QOperator (QLinearConv etc.)
    activation_dtype: str = "int8"
    weight_dtype: str = "int8"
    per_channel: bool = False
    calibration_method: str = "MinMax"
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI
    calibration_batch_size: int = 100  # histogram calibrators need every batch the same size
    extra_options: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self):
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"quant_format must be one of {QUANT_FORMATS}")
        if self.activation_dtype not in DTYPES or self.weight_dtype not in DTYPES:
            raise ValueError(f"dtypes must be one of {DTYPES}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration_method must be one of {CALIBRATION_METHODS}")

    @property
    def backend(self) -> str:
        return "onnxruntime-cpu"

    def qconfig_summary(self) -> str:
        weights = f"{'per-channel' if self.per_channel else 'per-tensor'} {self.weight_dtype}"
        extra = "; " + ", ".join(f"{k}={v}" for k, v in self.extra_options) if self.extra_options else ""
        return (f"{self.quant_format} weights: {weights}; activations: {self.calibration_method} "
                f"{self.activation_dtype}{' reduce_range' if self.reduce_range else ''}{extra}")


class _ArrayReader:
    """CalibrationDataReader over fixed-size batches of model-ready inputs."""

    def __init__(self, input_name: str, calibration: np.ndarray, batch_size: int, advance: Callable[[int], None]):
        self._advance = advance
        self._batches = [b for b in batches(calibration, batch_size) if len(b) == batch_size] or [calibration]
        self._input_name = input_name
        self._next = 0

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        self._next += 1
        self._advance(len(self._batches[self._next - 1]))
        return {self._input_name: self._batches[self._next - 1]}

    def rewind(self):
        self._next = 0


def quantize(float_model: FloatModel, config: OrtStaticConfig, calibration: np.ndarray, out_dir: Path,
             advance: Callable[[int], None] = lambda n: None) -> QuantizedModel:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    batch_size = float_model.onnx.input.batch_size or config.calibration_batch_size
    reader = _ArrayReader(float_model.onnx.input.name, calibration, batch_size, advance)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        tmp_model = Path(scratch) / MODEL_FILE_NAME
        quantize_static(
            str(float_model.ort_ready_path),
            str(tmp_model),
            reader,
            quant_format=getattr(QuantFormat, config.quant_format),
            activation_type=qtype[config.activation_dtype],
            weight_type=qtype[config.weight_dtype],
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            calibrate_method=getattr(CalibrationMethod, config.calibration_method),
            extra_options=dict(config.extra_options),
        )
        path = out_dir / MODEL_FILE_NAME
        write_atomic(path, tmp_model.read_bytes())
    return QuantizedModel(path=path, format="onnx")
