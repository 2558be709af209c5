"""ONNX Runtime static quantization (`quantize_static`) of the pre-processed FP32 model."""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ptqflow.common.files import file_sha256, write_atomic
from ptqflow.models.backends.base import (WEIGHT_ROUNDINGS, FloatModel, QuantizedModel, UnsupportedVariant, batches,
                                         cache_root)
from ptqflow.models.backends.ort_calibration import calibrator_speedups

MODEL_FILE_NAME = "model.onnx"
QUANT_FORMATS = ("QDQ", "QOperator")
DTYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


@dataclass(frozen=True)
class OrtStaticConfig:
    """One quantize_static recipe. Every field is logged as an MLflow param or in qconfig.json."""

    quant_format: str = "QDQ"  # QDQ (quantize/dequantize pairs) or QOperator (QLinearConv etc.)
    activation_dtype: str = "int8"
    weight_dtype: str = "int8"
    per_channel: bool = True
    calibration_method: str = "Percentile"
    # 99.995 measured best on resnet8 for all three ORT variants (98.40-98.73% agreement vs 98.29-98.43% at 99.999).
    extra_options: tuple[tuple[str, object], ...] = (("CalibPercentile", 99.995),)
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI
    weight_rounding: str = "adaround"  # adaround (weights pre-rounded on the FP32 model) or nearest
    float_head: bool = True  # pool, dense and softmax stay float: 8-bit logits tie under argmax
    calibration_batch_size: int = 100  # at most; the histogram calibrators need every batch the same size
    # Cross-layer equalization of Conv -> Relu -> Conv pairs (ptqflow.models.backends.equalization) on the FP32 model, before AdaRound
    # and quantization: one channel's large range stops setting the whole activation's scale.
    equalization: bool = False
    # QDQ only: activation tensors (ONNX tensor names) quantized to 16 bits (QInt16 for int8 activations, QUInt16
    # for uint8) through TensorQuantOverrides; onnxruntime's mixed-precision fixer widens the nodes around them and
    # inserts the 8 <-> 16-bit conversions.
    activation_16bit_tensors: tuple[str, ...] = ()
    # Layers (ONNX node names, as the diagnosis table names them) left in FP32 through nodes_to_exclude, each with
    # the Relu fused into it.
    fp32_nodes: tuple[str, ...] = ()
    # Convolutions whose int8 kernel is slower here than their FP32 one stay in FP32
    # (ptqflow.models.backends.speed_check)
    speed_check: bool = True

    def __post_init__(self):
        # JSON (qconfig.json) gives lists back: the config stays hashable and compares equal to the original.
        object.__setattr__(self, "extra_options", tuple((str(k), v) for k, v in self.extra_options))
        object.__setattr__(self, "activation_16bit_tensors", _names(self.activation_16bit_tensors,
                                                                    "activation_16bit_tensors"))
        object.__setattr__(self, "fp32_nodes", _names(self.fp32_nodes, "fp32_nodes"))
        if self.activation_16bit_tensors and self.quant_format != "QDQ":
            raise ValueError("activation_16bit_tensors needs quant_format QDQ: QOperator kernels take 8-bit "
                             "activations only")
        if self.quant_format not in QUANT_FORMATS:
            raise ValueError(f"quant_format must be one of {QUANT_FORMATS}")
        if self.activation_dtype not in DTYPES or self.weight_dtype not in DTYPES:
            raise ValueError(f"dtypes must be one of {DTYPES}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration_method must be one of {CALIBRATION_METHODS}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {WEIGHT_ROUNDINGS}")
        if self.calibration_method != "Percentile" and any(k == "CalibPercentile" for k, _ in self.extra_options):
            raise ValueError("CalibPercentile applies only to calibration_method Percentile")

    @property
    def backend(self) -> str:
        return "onnxruntime-cpu"

    @property
    def adaround_scheme(self) -> str | None:
        """The weight grid AdaRound must target so onnxruntime reproduces its integers, or None."""
        if self.weight_rounding != "adaround" or self.reduce_range:
            return None
        if self.weight_dtype == "int8" and self.per_channel:
            return "per_channel_sym_int8"
        if self.weight_dtype == "uint8" and not self.per_channel:
            return "per_tensor_asym_uint8"
        if self.weight_dtype == "int8":
            return "per_tensor_sym_int8"
        return None

    @classmethod
    def from_dict(cls, payload: dict) -> "OrtStaticConfig":
        """The config a `ptqflow.pipelines.variants.specs.config_payload` (qconfig.json's "config") was made from; unknown keys are ignored."""
        from dataclasses import fields

        return cls(**{f.name: payload[f.name] for f in fields(cls) if f.name in payload})

    def qconfig_summary(self) -> str:
        weights = f"{'per-channel' if self.per_channel else 'per-tensor'} {self.weight_dtype}"
        extra = "; " + ", ".join(f"{k}={v}" for k, v in self.extra_options) if self.extra_options else ""
        extras = ([self.weight_rounding + " rounding"] + (["float head"] if self.float_head else [])
                  + (["equalization"] if self.equalization else [])
                  + ([f"16-bit activations: {', '.join(self.activation_16bit_tensors)}"]
                     if self.activation_16bit_tensors else [])
                  + ([f"FP32 layers: {', '.join(self.fp32_nodes)}"] if self.fp32_nodes else [])
                  + (["FP32 where int8 is slower"] if self.speed_check else []))
        return (f"{self.quant_format} weights: {weights}; activations: {self.calibration_method} "
                f"{self.activation_dtype}{' reduce_range' if self.reduce_range else ''}{extra}; {', '.join(extras)}")


def _names(values, option: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ValueError(f"{option} takes a sequence of names, not the string {values!r}")
    names = tuple(values)
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{option} must be non-empty names")
    return names


def equal_batch_size(count: int, at_most: int) -> int:
    """The largest batch size <= at_most that splits `count` images into equal batches: onnxruntime's histogram
    calibrators stack the batches' outputs and fail on a short last batch, and dropping it would calibrate on fewer
    images than recorded."""
    return next(size for size in range(min(at_most, count), 0, -1) if count % size == 0)


class _ArrayReader:
    """CalibrationDataReader over equal-size batches covering every model-ready calibration input."""

    def __init__(self, input_name: str, calibration: np.ndarray, batch_size: int, advance: Callable[[int], None]):
        self._advance = advance
        self._batches = list(batches(calibration, batch_size))
        self._input_name = input_name
        self._next = 0
        self.images = 0  # how many images calibration actually read

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        self._next += 1
        batch = self._batches[self._next - 1]
        self.images += len(batch)
        self._advance(len(batch))
        return {self._input_name: batch}

    def rewind(self):
        self._next = 0


def check_opset(model, config: OrtStaticConfig) -> None:
    """Per-channel weights need opset 13 (DequantizeLinear's `axis`): a model the version converter could not bring
    up to it is refused for per-channel configs in one line, rather than by onnxruntime's graph check naming every
    node."""
    from ptqflow.models.graph.rewrites import MIN_QUANTIZATION_OPSET, model_opset

    opset = model_opset(model)
    if opset < MIN_QUANTIZATION_OPSET and config.per_channel:
        raise UnsupportedVariant(f"per-channel weights need opset {MIN_QUANTIZATION_OPSET}, and onnx.version_converter "
                                 f"could not bring this opset-{opset} model there; re-export it at opset 13 or later")


def quantize(float_model: FloatModel, config: OrtStaticConfig, calibration: np.ndarray, out_dir: Path,
             advance: Callable[[int], None] = lambda n: None) -> QuantizedModel:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    fixed = float_model.onnx.input.batch_size
    if fixed and len(calibration) % fixed:
        raise ValueError(f"the model's fixed batch size {fixed} does not divide {len(calibration)} calibration images")
    batch_size = fixed or equal_batch_size(len(calibration), config.calibration_batch_size)
    reader = _ArrayReader(float_model.onnx.input.name, calibration, batch_size, advance)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_model = float_model.ready_for(config, calibration)
    import onnx

    ready = onnx.load(str(float_model.ort_ready_path))
    check_opset(ready, config)
    excluded = excluded_nodes(float_model, config, ready)
    slow = slower_in_int8(float_model, config, excluded)
    excluded += [name for name in ready_node_names(float_model, ready, set(slow)) if name not in excluded]
    extra_options = dict(config.extra_options)
    if config.activation_16bit_tensors:
        extra_options["TensorQuantOverrides"] = tensor_overrides_16bit(ready, config)
    ranges = calibration_cache_path(float_model.ort_ready_path, calibration, batch_size, config)
    cached = _usable_ranges(ranges)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch, contextlib.redirect_stdout(io.StringIO()), \
            calibrator_speedups():
        # (stdout: the histogram calibrators print their progress there)
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
            extra_options=extra_options,
            nodes_to_exclude=excluded,
            calibration_cache_path=str(ranges),
        )
        path = out_dir / MODEL_FILE_NAME
        write_atomic(path, tmp_model.read_bytes())
    if cached:  # the ranges came from these very images (the cache key holds them); the reader was never read
        advance(len(calibration))
    return QuantizedModel(path=path, format="onnx", calibration_images=len(calibration) if cached else reader.images,
                          kept_float=slow)


CALIBRATION_CACHE_VERSION = "ort-ranges-v1"
# quantize_static options that reach the calibrator (onnxruntime passes the Calib* keys to it) or change the model
# it runs (SmoothQuant). Activation and weight types are not among them: the calibrator records float ranges of
# the FP32 model's tensors, and the types only turn those ranges into scales afterwards, so variants that differ
# only in types (ort-int8 and ort-int8-u8s8) share one calibration.
_CALIBRATION_OPTIONS = ("SmoothQuant", "SmoothQuantAlpha", "SmoothQuantFolding")


def calibration_cache_path(ready_model: Path, calibration: np.ndarray, batch_size: int,
                           config: OrtStaticConfig) -> Path:
    """The file onnxruntime keeps `config`'s calibration ranges in (quantize_static's calibration_cache_path),
    keyed by everything that shapes them: the model bytes the calibrator runs, the calibration images themselves
    (bytes, shape, dtype), their batching, the method and its options, and the onnxruntime version."""
    import hashlib
    import json

    import onnxruntime

    images = np.ascontiguousarray(calibration)
    options = {key: value for key, value in config.extra_options
               if key.startswith("Calib") or key in _CALIBRATION_OPTIONS}
    payload = {"version": CALIBRATION_CACHE_VERSION, "model": file_sha256(Path(ready_model)),
               "images": hashlib.sha256(images.tobytes()).hexdigest(), "shape": list(images.shape),
               "dtype": str(images.dtype), "batch_size": batch_size, "method": config.calibration_method,
               "options": options, "onnxruntime": onnxruntime.__version__}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / "calibration" / f"{key}.json"


def _usable_ranges(path: Path) -> bool:
    """Whether `path` holds ranges onnxruntime can load; an unreadable file (a crash mid-write on a filesystem
    without atomic rename, a foreign file) is removed so the calibration runs again and rewrites it."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    if not path.is_file():
        return False
    try:
        load_tensors_data(path)
        return True
    except (ValueError, KeyError, TypeError, OSError):
        path.unlink(missing_ok=True)
        return False


def ready_node_names(float_model: FloatModel, ready, nodes: set[str]) -> list[str]:
    """The nodes of the pre-processed model `ready` that stand for the ONNX nodes `nodes` of the FP32 model: the same
    name, or for a node onnxruntime's pre-processing made by fusing (e.g. `<MatMul>/MatMulAddFusion`), the node it is
    named after."""
    from ptqflow.models.graph.layer_map import node_for_name

    original = [node.name for node in float_model.onnx.proto.graph.node]
    known = set(original)
    return [node.name for node in ready.graph.node
            if (node.name in nodes if node.name in known else node_for_name(node.name, original) in nodes)]


def excluded_nodes(float_model: FloatModel, config: OrtStaticConfig, ready) -> list[str]:
    """nodes_to_exclude: the float head's nodes and the config's FP32 layers (with their fused Relu), as the
    pre-processed model `ready` names them. A name that is no node of the model is a ValueError."""
    excluded = []
    if config.float_head:
        from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes

        excluded = onnx_classifier_head_nodes(ready)
    if config.fp32_nodes:
        from ptqflow.models.graph.layer_map import layer_nodes

        chosen = layer_nodes(float_model.onnx.proto, config.fp32_nodes, "fp32_nodes")
        excluded += [name for name in ready_node_names(float_model, ready, chosen) if name not in excluded]
    return excluded


def slower_in_int8(float_model: FloatModel, config: OrtStaticConfig, excluded) -> dict[str, str]:
    """The FP32 model's Conv nodes the speed check keeps in FP32 (ptqflow.models.backends.speed_check), each with
    its timings. Nodes already `excluded` (the float head, as the pre-processed model names it) and the config's
    FP32 layers are not timed."""
    from ptqflow.models.backends.speed_check import slow_int8_layers
    from ptqflow.models.graph.layer_map import layer_nodes

    skip = set(excluded) | (layer_nodes(float_model.onnx.proto, config.fp32_nodes, "fp32_nodes")
                            if config.fp32_nodes else set())
    return {layer.node: layer.reason for layer in slow_int8_layers(float_model.onnx.proto, config, skip)}


def tensor_overrides_16bit(ready, config: OrtStaticConfig) -> dict:
    """TensorQuantOverrides putting `config.activation_16bit_tensors` in 16 bits, fixed by onnxruntime's
    MixedPrecisionTensorQuantOverridesFixer so that the nodes around them get valid input and output types (it adds
    "convert" entries where 8- and 16-bit parts of the graph meet)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn.mixed_precision_overrides_utils import (
        MixedPrecisionTensorQuantOverridesFixer,
    )
    from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

    narrow = QuantType.QInt8 if config.activation_dtype == "int8" else QuantType.QUInt8
    wide = QuantType.QInt16 if config.activation_dtype == "int8" else QuantType.QUInt16
    tensors = {name for node in ready.graph.node for name in node.output}
    missing = [name for name in config.activation_16bit_tensors if name not in tensors]
    if missing:
        raise ValueError(f"activation_16bit_tensors: the model has no activation tensor {missing[0]!r}; the "
                         "diagnosis table names each layer's input tensor")
    producer = {name: node for node in ready.graph.node for name in node.output}
    readers: dict[str, int] = {}
    for node in ready.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    wanted = list(config.activation_16bit_tensors)
    for name in config.activation_16bit_tensors:
        # A Relu/Clip output: the tensor before the activation is the layer's own output (the quantizer folds the
        # activation into the layer's output range), so it must be 16-bit too, or the 8-bit rounding happens first.
        node = producer.get(name)
        while node is not None and node.op_type in ("Relu", "Clip") and readers.get(node.input[0]) == 1:
            wanted.append(node.input[0])
            node = producer.get(node.input[0])
    overrides = TensorQuantOverridesHelper({name: [{"quant_type": wide}] for name in dict.fromkeys(wanted)})
    fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(overrides, ready, narrow)
    fixer.apply(narrow, default_activation_symmetric=bool(dict(config.extra_options).get("ActivationSymmetric")))
    return overrides.get_dict()
