"""What every quantization backend shares: the float model it starts from and what it hands back."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ptqflow.common.files import array_sha256, file_sha256, write_atomic
from ptqflow.common.versions import package_versions
from ptqflow.models.graph.onnx_model import OnnxClassifier, to_torch


# Bump when the algorithm or its defaults change: a cached result from older code is not the same result.
# How a config puts its weights on the integer grid: AdaRound first (onto the grid the backend then reproduces), or
# the quantizer's own round-to-nearest
WEIGHT_ROUNDINGS = ("adaround", "nearest")
ADAROUND_VERSION = ("adaround-v10:lambda=1,lr=0.01,seed=0,nearest-fallback-per-channel,own-output-exact-quadratic,"
                    "all-images,stop-when-saturated,large-layers-on-torch-threads,"
                    "depthwise-bias-correction-in-activation-range")
# Libraries whose numerics shape AdaRound's result (the torch conversion and its optimizer).
ADAROUND_LIBRARIES = ("torch", "onnx", "onnx2torch", "numpy")


def adaround_cache_key(model_sha256: str, calibration: np.ndarray, calibration_digest: str, scheme: str,
                       iterations: int, context: dict | None = None) -> str:
    """Everything that shapes an AdaRound result: the model, the calibration images' bytes as the model sees them
    (so another copy of the data, layout or preprocessing misses the cache), which images they are, the grid, the
    iterations, the algorithm version, the library versions and torch's thread count (a large layer's matrix
    product sums in another order on another number of threads, which can tip a weight's rounding)."""
    import torch

    payload = {"algorithm": ADAROUND_VERSION, "iterations": iterations, "model_sha256": model_sha256,
               "torch_threads": torch.get_num_threads(),
               "calibration_sha256": array_sha256(calibration), "calibration_indices_sha256": calibration_digest,
               "scheme": scheme, "versions": package_versions(ADAROUND_LIBRARIES), "context": context or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_root() -> Path:
    """Where ptqflow keeps results that are slow to compute and keyed by everything that shapes them."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ptqflow"


def adaround_cache_dir() -> Path:
    return cache_root() / "adaround"


class UnsupportedVariant(Exception):
    """The backend library refuses this configuration; `reason` is the library's own words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


BACKEND_LIBRARIES = ("torch", "onnxruntime", "onnx", "onnx2torch")  # the code that makes and runs the models


def backend_error(exc: BaseException) -> bool:
    """Whether `exc` is a backend's own refusal or failure of a configuration: UnsupportedVariant, or an exception
    raised inside the code of BACKEND_LIBRARIES (its type is theirs, or the innermost frame of its traceback that is
    either theirs or ptqflow's is theirs). A bug in ptqflow's own code (a KeyError there), a tracking failure or a
    bad option is not one, and must not be recorded as a configuration the backend could not make."""
    def library(module: str) -> bool:
        return module.split(".")[0] in BACKEND_LIBRARIES

    if isinstance(exc, UnsupportedVariant) or library(type(exc).__module__):
        return True
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for module in reversed(frames):  # innermost first; frames of other modules (numpy, the stdlib) do not decide
        if library(module):
            return True
        if module.split(".")[0] == "ptqflow":
            return False
    return False


@dataclass
class FloatModel:
    """The FP32 model in each form a backend needs, each made once per sweep and shared by all variants."""

    onnx: OnnxClassifier
    work_dir: Path
    _torch_module: object = field(default=None, repr=False)
    _ort_ready: Path | None = field(default=None, repr=False)
    _rounded: dict = field(default_factory=dict, repr=False)
    _equalized: "FloatModel | None" = field(default=None, repr=False)
    _equalized_on_data: bool = field(default=False, repr=False)  # made with calibration maxima (Clip pairs included)
    _float_weights: dict = field(default_factory=dict, repr=False)
    folded_batch_norms: int = 0  # BatchNormalizations for_quantization folded into the Conv before them
    # Mul/Add/Sub/Div of a Conv's output by per-channel constants for_quantization folded into that Conv
    folded_channel_constants: int = 0
    # the model's own opset when for_quantization brought it up to rewrites.MIN_QUANTIZATION_OPSET; None: unchanged
    upgraded_from_opset: int | None = None
    equalization: "object | None" = None  # ptqflow.models.backends.equalization.EqualizationSummary once equalized
    adaround_scheme: str | None = None  # the grid AdaRound put the weights on, once it has
    bias_corrected_channels: int = 0  # depthwise channels whose bias AdaRound's bias correction changed

    @classmethod
    def for_runtimes(cls, model: OnnxClassifier, work_dir: Path) -> "FloatModel":
        """The user's model, or, when its weights live in external data files, a self-contained copy in work_dir
        (ONNX Runtime's shape inference in quant_pre_process cannot read shape tensors kept in external data).
        Identity (SHA-256, size) stays that of the user's files."""
        if not model.external_files:
            return cls(model, work_dir)
        path = work_dir / "fp32-embedded" / model.path.name
        write_atomic(path, model.proto.SerializeToString())  # the proto was loaded with its external data
        return cls(replace(model, path=path, external_files=()), work_dir)

    def prepare(self, torch: bool, onnxruntime: bool) -> None:
        """Build the requested forms now (instead of lazily inside the first variant), e.g. to time them."""
        if torch:
            _ = self.torch_module
        if onnxruntime:
            _ = self.ort_ready_path

    @property
    def torch_module(self):
        if self._torch_module is None:
            self._torch_module = to_torch(self.onnx)
        return self._torch_module

    def _adaround_cache_file(self, scheme: str, calibration: np.ndarray, calibration_digest: str, iterations: int,
                             context: dict | None, round_head: bool) -> Path:
        key = adaround_cache_key(self.onnx.sha256, calibration, calibration_digest, scheme, iterations,
                                 {**(context or {}), "round_head": round_head})
        return adaround_cache_dir() / f"{key}.onnx"

    def adaround_ahead(self, schemes: list[str], calibration: np.ndarray, calibration_digest: str,
                       advance: Callable[..., None] = lambda n, total=None: None, iterations: int = 1000,
                       context: dict | None = None, round_head: bool = True) -> list[str]:
        """Compute and cache, in one go, the AdaRounded models of every scheme in `schemes` not cached yet: one FP32
        pass and the schemes' problems side by side (see `adaround_onnx_schemes`), each result the same as
        `with_adarounded_weights` computes alone, which then finds it in the cache. Returns the schemes computed."""
        missing = [scheme for scheme in dict.fromkeys(schemes)
                   if (scheme, iterations, round_head) not in self._rounded and not self._adaround_cache_file(
                       scheme, calibration, calibration_digest, iterations, context, round_head).is_file()]
        if missing:
            from ptqflow.models.adaround.onnx import adaround_onnx_schemes

            rounded = adaround_onnx_schemes(self.onnx.proto, calibration, missing, iters=iterations, advance=advance,
                                            model_batch=self.onnx.input.batch_size or 250, round_head=round_head)
            for scheme, proto in rounded.items():
                write_atomic(self._adaround_cache_file(scheme, calibration, calibration_digest, iterations, context,
                                                       round_head), proto.SerializeToString())
        return missing

    def with_adarounded_weights(self, scheme: str, calibration: np.ndarray, calibration_digest: str,
                                advance: Callable[..., None] = lambda n, total=None: None,
                                iterations: int = 1000, context: dict | None = None,
                                round_head: bool = True) -> "FloatModel":
        """The same FP32 model with every Conv/MatMul/Gemm weight moved onto `scheme`'s int8 grid by AdaRound, so
        any quantizer with that scheme reproduces the optimized integers. Computed once per scheme and cached on
        disk, since it is the slowest step of a sweep; `context` (layout, preprocessing, ...) joins the key.
        `round_head=False` keeps the classifier head's FP32 weights, for backends that run the head in float."""
        memo = (scheme, iterations, round_head)
        if memo in self._rounded:
            return self._rounded[memo]
        import onnx

        cached = self._adaround_cache_file(scheme, calibration, calibration_digest, iterations, context, round_head)
        if not cached.is_file():
            self.adaround_ahead([scheme], calibration, calibration_digest, advance, iterations, context, round_head)
        from ptqflow.models.adaround.bias_correction import corrected_bias_count

        rounded = onnx.load(str(cached))
        variant = self._derived(rounded, cached,
                                self.work_dir / f"adaround-{scheme}{'' if round_head else '-float-head'}",
                                adaround_scheme=scheme,
                                bias_corrected_channels=corrected_bias_count(self.onnx.proto, rounded))
        variant.work_dir.mkdir(parents=True, exist_ok=True)
        self._rounded[memo] = variant
        return variant

    def _written(self, proto, work_dir: Path, **record) -> "FloatModel":
        """`proto` written to work_dir/<model file> as a model derived from this one (_derived)."""
        path = work_dir / self.onnx.path.name
        write_atomic(path, proto.SerializeToString())
        return self._derived(proto, path, work_dir, **record)

    def _derived(self, proto, path: Path, work_dir: Path, **record) -> "FloatModel":
        """The model `proto`, stored at `path` (embedding its weights), working in `work_dir`, that keeps this
        model's record (folded BatchNorms, upgraded opset, equalization, AdaRound grid) except what `record` sets."""
        from ptqflow.models.graph.onnx_model import read_input_spec

        kept = {"folded_batch_norms": self.folded_batch_norms, "upgraded_from_opset": self.upgraded_from_opset,
                "folded_channel_constants": self.folded_channel_constants,
                "equalization": self.equalization, "adaround_scheme": self.adaround_scheme,
                "bias_corrected_channels": self.bias_corrected_channels}
        return FloatModel(replace(self.onnx, path=path, proto=proto, sha256=file_sha256(path),
                                  size_bytes=path.stat().st_size, input=read_input_spec(proto, path),
                                  external_files=()), work_dir, **{**kept, **record})

    def for_quantization(self) -> "FloatModel":
        """The FP32 model quantization starts from: BatchNormalization folded into the Conv before it and every node
        named, written to work_dir/fp32-quantization/<model file>. Folding first keeps weights that AdaRound put on
        the int8 grid there (onnxruntime's pre-processing and FX would fold BatchNorm after rounding); names let
        `nodes_to_exclude` select nodes. Weights fed by Constant or Identity nodes become initializers, and a model
        below opset 13 is brought up to it (per-channel QDQ needs it). `self` when there is nothing to change. The
        result records the number of folded BatchNormalizations (`folded_batch_norms`) and the original opset when
        upgraded (`upgraded_from_opset`)."""
        from ptqflow.models.graph.rewrites import (channel_constants_as_batch_norms, explicit_pads,
                                                   fold_batch_norms, has_unnamed_nodes, materialize_constants,
                                                   model_opset, name_unnamed_nodes, upgrade_opset)

        proto, materialized = materialize_constants(self.onnx.proto)
        proto, padded = explicit_pads(proto)
        proto, folded = fold_batch_norms(proto)
        constants = 0
        while True:  # a Conv's Mul then Add: the Add reads the Conv once the Mul is folded
            proto, found = channel_constants_as_batch_norms(proto)
            if not found:
                break
            proto, _ = fold_batch_norms(proto)
            constants += found
        opset = model_opset(proto)
        try:
            proto = upgrade_opset(proto)
        except Exception:  # noqa: BLE001 - no adapter for an op: the backends that need opset 13 refuse (ort.py)
            pass
        upgraded = opset if model_opset(proto) != opset else None
        if not (materialized or padded or folded or constants or upgraded) and not has_unnamed_nodes(proto):
            return self
        return self._written(name_unnamed_nodes(proto), self.work_dir / "fp32-quantization",
                             folded_batch_norms=self.folded_batch_norms + folded, upgraded_from_opset=upgraded,
                             folded_channel_constants=self.folded_channel_constants + constants)

    def equalized(self, calibration: np.ndarray | None = None) -> "FloatModel":
        """The same function with cross-layer equalization of its Conv -> activation -> Conv pairs
        (ptqflow.models.backends.equalization), written to work_dir/equalized/<model file>; made once. Pairs joined by
        Clip(0, b) (ReLU6) are equalized only with model-ready `calibration` images (their per-channel maxima keep
        the scales below the bound): a model made without them is made again when they come. Equalize before
        AdaRound: it moves weights, so weights already on an int8 grid would leave it."""
        if self.equalization is not None:
            return self
        if self._equalized is not None and (calibration is None or self._equalized_on_data):
            return self._equalized
        if self.adaround_scheme is not None:
            raise ValueError("equalize the FP32 model before AdaRound: equalization moves the weights off the "
                             f"{self.adaround_scheme} grid AdaRound put them on")
        from ptqflow.models.backends.equalization import clip_maxima, equalize

        maxima = clip_maxima(self.onnx.proto, calibration) if calibration is not None else None
        proto, summary = equalize(self.onnx.proto, maxima=maxima)
        variant = self._written(proto, self.work_dir / "equalized", equalization=summary)
        self._equalized, self._equalized_on_data = variant, calibration is not None
        return variant

    def for_config(self, config, calibration: np.ndarray, calibration_digest: str,
                   advance: Callable[..., None] = lambda n, total=None: None, iterations: int = 1000,
                   context: dict | None = None) -> "FloatModel":
        """The FP32 model a backend config quantizes, in the order the steps must run: equalized when
        `config.equalization`, then AdaRound-ed onto `config.adaround_scheme`'s grid when it has one (keeping a float
        head's FP32 weights when `config.float_head`, and the FP32 weights of the layers the config keeps in FP32:
        a grid only adds error to a layer that runs in float)."""
        model = self.equalized(calibration) if getattr(config, "equalization", False) else self
        if config.adaround_scheme is None:
            return model
        rounded = model.with_adarounded_weights(config.adaround_scheme, calibration, calibration_digest, advance,
                                                iterations=iterations, context=context,
                                                round_head=not config.float_head)
        fp32 = tuple(getattr(config, "fp32_nodes", ())) + tuple(getattr(config, "fp32_modules", ()))
        return rounded.with_float_weights(model, fp32) if fp32 else rounded

    def with_float_weights(self, original: "FloatModel", names) -> "FloatModel":
        """This model with the weights (and biases) of the layers `names` (ONNX node names, as the diagnosis names
        layers, or FX module names derived from them; ptqflow.models.graph.layer_map) taken from `original`, the same model before
        AdaRound: the AdaRound cache stays one per grid, and a layer kept in FP32 computes with its FP32 weights.
        Written to work_dir/float-weights-<digest>/<model file>; made once per set of names."""
        from ptqflow.models.graph.layer_map import layer_nodes, node_for_name

        node_names = [node.name for node in self.onnx.proto.graph.node]
        # a name that is no node here is the quantizer's to refuse (with the list of layers)
        resolved = sorted({node for node in (name if name in node_names else node_for_name(name, node_names)
                                             for name in names) if node})
        if not resolved:
            return self
        if tuple(resolved) in self._float_weights:
            return self._float_weights[tuple(resolved)]
        import onnx

        chosen = layer_nodes(self.onnx.proto, resolved, "fp32 layers")
        originals = {init.name: init for init in original.onnx.proto.graph.initializer}
        wanted = {name for node in self.onnx.proto.graph.node if node.name in chosen for name in node.input}
        proto = onnx.ModelProto()
        proto.CopyFrom(self.onnx.proto)
        for init in proto.graph.initializer:
            if init.name in wanted and init.name in originals:
                init.CopyFrom(originals[init.name])
        digest = hashlib.sha256(json.dumps(resolved).encode()).hexdigest()[:12]
        variant = self._written(proto, self.work_dir / f"float-weights-{digest}")
        self._float_weights[tuple(resolved)] = variant
        return variant

    def ready_for(self, config, calibration: np.ndarray | None = None) -> "FloatModel":
        """What a quantizer starts from: this model, equalized first (on `calibration`'s maxima, see `equalized`)
        when `config.equalization` asks for it and it is not yet (a ValueError when AdaRound already ran on
        unequalized weights: use `for_config`)."""
        if getattr(config, "equalization", False) and self.equalization is None:
            return self.equalized(calibration)
        return self

    @property
    def ort_ready_path(self) -> Path:
        """The model after onnxruntime's quantization pre-processing (shape inference, graph optimization), with
        every node named so `nodes_to_exclude` can select any of them."""
        if self._ort_ready is None:
            import onnx
            from onnxruntime.quantization.shape_inference import quant_pre_process

            from ptqflow.models.graph.rewrites import has_unnamed_nodes, name_unnamed_nodes

            target = self.work_dir / "fp32_preprocessed.onnx"
            if target.resolve() == self.onnx.path.resolve():  # never overwrite the model itself
                target = self.work_dir / "fp32_preprocessed-ort.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            # ONNX shape inference suffices for fixed-size image models; symbolic inference costs seconds (sympy).
            quant_pre_process(str(self.onnx.path), str(target), skip_symbolic_shape=True)
            processed = onnx.load(str(target))
            if has_unnamed_nodes(processed):
                write_atomic(target, name_unnamed_nodes(processed).SerializeToString())
            self._ort_ready = target
        return self._ort_ready


@dataclass(frozen=True)
class QuantizedModel:
    path: Path
    format: str  # "torchscript" or "onnx"
    calibration_images: int = 0  # how many calibration images the backend's observers actually saw
    # PyTorch FX: the quantize_pytorch.FxGraphs the file was traced from, for numeric-suite tools (a diagnosis right
    # after quantization needs no second calibration); None for ONNX
    graphs: object = field(default=None, repr=False, compare=False)
    kept_float: dict = field(default_factory=dict)  # layers the backend could not quantize, left in float: name -> why
    # PyTorch FX: layers the int8 engine computed away from their quantization (engine_check): name -> share off
    engine_departures: dict = field(default_factory=dict)
    fusion_fallback: str = ""  # PyTorch FX: the backend's fusion patterns left out, and why ("" when none)


def batches(array: np.ndarray, batch_size: int):
    for start in range(0, len(array), batch_size):
        yield array[start:start + batch_size]
