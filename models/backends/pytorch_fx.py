"""PyTorch FX graph-mode static quantization: prepare_fx → calibrate → convert_fx → TorchScript.

FX GraphModules do not pickle reliably, so the quantized model is traced and saved as TorchScript.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ptqflow.common.errors import first_line
from ptqflow.common.files import write_atomic
from ptqflow.common.files import array_sha256, update_with_tensors
from ptqflow.models.backends.base import WEIGHT_ROUNDINGS, FloatModel, QuantizedModel, UnsupportedVariant, batches
from ptqflow.models.backends.fx_exactness import SATURATION_POLICIES, SATURATION_SUMMARIES, inexact_layers

BACKENDS = ("fbgemm", "x86", "onednn")
MODEL_FILE_NAME = "model.pt"


@dataclass(frozen=True)
class PytorchFxConfig:
    """One FX static quantization recipe. Every field is logged as an MLflow param or in qconfig.json."""

    backend: str = "fbgemm"  # quantized engine and backend config: fbgemm, x86 or onednn
    weight_dtype: str = "qint8"  # qint8; quint8 is attempted to record that fbgemm/x86 refuse it
    activation_dtype: str = "quint8"
    per_channel: bool = True  # per-output-channel symmetric weight scales, range [-127, 127]
    activation_observer: str = "percentile"  # percentile, histogram, minmax or moving_minmax
    percentile: float = 99.995  # for the percentile observer: clip the rarest activation outliers
    reduce_range: bool = False  # 7-bit activations only matter on CPUs without VNNI
    weight_rounding: str = "adaround"  # adaround (weights pre-rounded on the FP32 model) or nearest
    float_head: bool = True  # pool, dense and softmax stay float: 8-bit logits tie under argmax
    graph_preparation: bool = True  # ptqflow.models.graph.fx_prep rewrites before prepare_fx
    calibration_batch_size: int = 100
    # Cross-layer equalization of Conv -> Relu -> Conv pairs (ptqflow.models.backends.equalization) on the FP32 model, before AdaRound
    # and quantization: one channel's large range stops setting the whole activation's scale.
    equalization: bool = False
    # Layers left in FP32 (qconfig None): ONNX node names as the diagnosis table names them (each with the Relu
    # fused into it), or FX module names of the graph-prepared module.
    fp32_modules: tuple[str, ...] = ()
    # The model input quantized over the calibration inputs' whole range (fx_qconfig.observe_whole_input_range):
    # pixels are not outliers, and raw or unit pixels are then quantized exactly
    whole_input_range: bool = True
    # Convolutions whose int8 module is slower than float in this engine here stay float
    # (ptqflow.models.backends.fx_speed_check; graph preparation only)
    speed_check: bool = True
    # fbgemm's depthwise kernels sum pairs of products in 16 bits, which saturate on 8-bit inputs
    # (ptqflow.models.backends.fx_exactness): "float" keeps the depthwise layers where that happens on the
    # calibration images in FP32, "seven-bit" gives every depthwise layer 7-bit inputs, "allowed" neither
    fbgemm_saturation: str = "float"

    def __post_init__(self):
        if isinstance(self.fp32_modules, str) or not all(isinstance(n, str) and n for n in self.fp32_modules):
            raise ValueError("fp32_modules takes a sequence of non-empty names")
        object.__setattr__(self, "fp32_modules", tuple(self.fp32_modules))  # JSON gives a list back
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.weight_dtype not in ("qint8", "quint8") or self.activation_dtype not in ("quint8", "qint8"):
            raise ValueError("dtypes must be qint8 or quint8")
        if self.activation_observer not in ("percentile", "histogram", "minmax", "moving_minmax"):
            raise ValueError("activation_observer must be percentile, histogram, minmax or moving_minmax")
        if self.fbgemm_saturation not in SATURATION_POLICIES:
            raise ValueError(f"fbgemm_saturation must be one of {SATURATION_POLICIES}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {WEIGHT_ROUNDINGS}")

    @property
    def quant_format(self) -> str:
        return "fx-static"

    @property
    def adaround_scheme(self) -> str | None:
        """The weight grid AdaRound must target so this backend reproduces its integers, or None."""
        if self.weight_rounding != "adaround" or self.weight_dtype != "qint8" or not self.per_channel:
            return None
        return "per_channel_sym_int8"

    @classmethod
    def from_dict(cls, payload: dict) -> "PytorchFxConfig":
        """The config a `ptqflow.pipelines.variants.specs.config_payload` (qconfig.json's "config") was made from; unknown keys are ignored."""
        from dataclasses import fields

        return cls(**{f.name: payload[f.name] for f in fields(cls) if f.name in payload})

    def qconfig_summary(self) -> str:
        weights = f"{'per-channel' if self.per_channel else 'per-tensor'} symmetric {self.weight_dtype}"
        observer = (f"percentile {self.percentile:g}" if self.activation_observer == "percentile"
                    else self.activation_observer)
        acts = f"{observer} {self.activation_dtype}{' reduce_range' if self.reduce_range else ''}"
        extras = ([self.weight_rounding + " rounding"] + (["float head"] if self.float_head else [])
                  + (["equalization"] if self.equalization else [])
                  + ([f"FP32 layers: {', '.join(self.fp32_modules)}"] if self.fp32_modules else [])
                  + (["FP32 where int8 is slower"] if self.speed_check and self.graph_preparation else [])
                  + (["input over its calibration range"] if self.whole_input_range else [])
                  + ([SATURATION_SUMMARIES[self.fbgemm_saturation]] if self.backend == "fbgemm" else []))
        return f"weights: {weights}; activations: {acts}; {', '.join(extras)}; backend: {self.backend}"


def _qconfig(config: PytorchFxConfig):
    import torch
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        PerChannelMinMaxObserver,
    )

    act_dtype = getattr(torch, config.activation_dtype)
    weight_dtype = getattr(torch, config.weight_dtype)
    act_observer = MinMaxObserver if config.activation_observer == "minmax" else HistogramObserver
    activation = act_observer.with_args(dtype=act_dtype, reduce_range=config.reduce_range)
    symmetric = torch.per_channel_symmetric if config.per_channel else torch.per_tensor_symmetric
    if weight_dtype == torch.quint8:  # symmetric schemes need a signed type
        symmetric = torch.per_channel_affine if config.per_channel else torch.per_tensor_affine
    weight_observer = PerChannelMinMaxObserver if config.per_channel else MinMaxObserver
    weight = weight_observer.with_args(dtype=weight_dtype, qscheme=symmetric)
    return QConfig(activation=activation, weight=weight)


def _backend_config(config: PytorchFxConfig, conv_second: bool = True):
    """The backend's own pattern config; for non-default dtypes, widened so FX attempts them instead of silently
    leaving conv/linear in float, and the kernel library gives its verdict."""
    import torch
    from torch.ao.quantization.backend_config import BackendConfig, DTypeConfig, get_fbgemm_backend_config
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

    # onednn's config fuses a convolution with the residual Add (and ReLU) after it (quantized::conv2d_add_relu,
    # a oneDNN post-op that only the onednn engine runs): one requantization fewer per residual block
    base = {"fbgemm": get_fbgemm_backend_config, "x86": get_x86_backend_config,
            "onednn": lambda: _onednn_backend_config(conv_second)}[config.backend]()
    if config.weight_dtype == "qint8" and config.activation_dtype == "quint8":
        return base
    act, weight = getattr(torch, config.activation_dtype), getattr(torch, config.weight_dtype)
    extra = DTypeConfig(input_dtype=act, output_dtype=act, weight_dtype=weight, bias_dtype=torch.float)
    widened = BackendConfig(f"{base.name}_{config.activation_dtype}_{config.weight_dtype}")
    for pattern_config in base.configs:
        if any(dc.weight_dtype is not None for dc in pattern_config.dtype_configs):
            pattern_config.add_dtype_config(extra)
        widened.set_backend_pattern_config(pattern_config)
    return widened


def _onednn_backend_config(conv_second: bool = True):
    """torch's onednn pattern config; without `conv_second`, without its conv + Add patterns whose convolution is the
    Add's second operand (`x + conv(y)`; `conv(y) + x` still fuses). On a MobileNetV2-style fixture, where `x` is
    another block's convolution, those patterns made a fused module that took the wrong tensor as the convolution's
    input; on ResNet8 they are the ones that fuse its blocks (`prepare_checked` chooses)."""
    import operator

    import torch
    import torch.ao.quantization.backend_config.utils  # noqa: F401 - get_onednn_backend_config reads it, unimported
    from torch.ao.quantization.backend_config import BackendConfig
    from torch.ao.quantization.backend_config.onednn import get_onednn_backend_config
    from torch.ao.quantization.utils import MatchAllNode

    def second(pattern) -> bool:
        if isinstance(pattern, tuple) and len(pattern) == 2 and pattern[0] is torch.nn.ReLU:
            pattern = pattern[1]
        return (isinstance(pattern, tuple) and len(pattern) == 3 and pattern[0] in (torch.add, operator.add)
                and pattern[1] is MatchAllNode)

    base = get_onednn_backend_config()
    if conv_second:
        return base
    kept = BackendConfig(base.name)
    for pattern_config in base.configs:
        if not second(pattern_config._pattern_complex_format):
            kept.set_backend_pattern_config(pattern_config)
    return kept


def _computes_like(source, prepared, example) -> bool:
    """Whether the prepared (fused, observed) model computes what `source` does on `example`, in float: fusion
    must not change the function. Runs a copy, so the observers see nothing."""
    import torch

    try:
        with torch.no_grad():
            expected, got = source(example), copy.deepcopy(prepared)(example)
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6))
    except Exception:  # noqa: BLE001 - a fused module fed the wrong tensor fails on its shape
        return False


# what a run records when prepare_checked left out onednn's conv-second Add patterns
CONV_SECOND_FALLBACK = ("onednn's patterns that fuse an Add whose second input is a convolution's output changed what "
                        "the model computes (a torch fusion fault), so it was prepared without them: those Adds run "
                        "as separate quantized adds")


def prepare_checked(source, mapping, example, config: PytorchFxConfig, leaves: list[str] | None = None):
    """(prepared, backend config, fallback): `prepare_traced` with the backend's pattern config, and for onednn,
    when that fusion does not compute what `source` does, again without the conv-second Add patterns (fallback:
    CONV_SECOND_FALLBACK then, else "")."""
    backend_config = _backend_config(config)
    prepared = prepare_traced(source, mapping, example, backend_config, leaves)
    if config.backend == "onednn" and not _computes_like(source, prepared, example):
        backend_config = _backend_config(config, conv_second=False)
        prepared = prepare_traced(source, mapping, example, backend_config, leaves)
        return prepared, backend_config, CONV_SECOND_FALLBACK
    return prepared, backend_config, ""


def fp32_module_names(module, config: PytorchFxConfig, onnx_proto) -> list[str]:
    """The modules of `module` that `config.fp32_modules` keeps in FP32: those named so, and those converted from
    the named ONNX nodes (a layer with its fused Relu; ptqflow.models.graph.layer_map). A name that is neither is a ValueError."""
    if not config.fp32_modules:
        return []
    from ptqflow.models.graph.layer_map import layer_nodes, node_for_name

    targets = [node.target for node in module.graph.nodes if node.op == "call_module"]
    onnx_names = [name for name in config.fp32_modules if name not in targets]
    chosen = layer_nodes(onnx_proto, onnx_names, "fp32_modules") if onnx_names else set()
    node_names = [node.name for node in onnx_proto.graph.node]
    return [t for t in targets if t in config.fp32_modules or node_for_name(t, node_names) in chosen]


def _qconfig_mapping(config: PytorchFxConfig, module, onnx_proto=None, slower: Sequence[str] = ()):
    """The recipe's mapping for qint8 weights; for other weight dtypes the same observers with those dtypes. The
    float head, `config.fp32_modules` and the modules `slower` in int8 (speed_kept) get qconfig None."""
    from torch.ao.quantization import get_default_qconfig_mapping

    fp32 = fp32_module_names(module, config, onnx_proto) if onnx_proto is not None else []
    if config.weight_dtype != "qint8" or not config.graph_preparation:
        mapping = get_default_qconfig_mapping(config.backend).set_global(_qconfig(config))
        for name in fp32:
            mapping.set_module_name(name, None)
        return mapping
    from ptqflow.models.backends.fx_qconfig import activation_bounds, fbgemm_depthwise_inputs, qconfig_mapping
    from ptqflow.models.graph.fx_modules import sole_readers
    from ptqflow.models.graph.fx_prep import classifier_head

    head = classifier_head(module) if config.float_head else []
    # a float layer's ReLU6 stays float with it: quantized alone, its input would be observed unbounded
    floats = list(dict.fromkeys([*head, *fp32, *slower, *sole_readers(module, {*fp32, *slower})]))
    return qconfig_mapping(config.backend, activation_observer=config.activation_observer,
                           percentile=config.percentile, reduce_range=config.reduce_range,
                           weight_observer="perchannel_minmax" if config.per_channel else "minmax",
                           float_modules=floats, bounded_outputs=activation_bounds(module),
                           seven_bit_outputs=fbgemm_depthwise_inputs(module, floats)
                           if config.backend == "fbgemm" and config.fbgemm_saturation == "seven-bit" else ())


def speed_kept(source, config: PytorchFxConfig, example, onnx_proto=None) -> dict[str, str]:
    """The convolutions of the graph-prepared `source` that `config`'s speed check keeps in float, each with why
    (ptqflow.models.backends.fx_speed_check); the float head and the config's FP32 layers are not timed."""
    if not _times_layers(config):
        return {}
    from ptqflow.models.backends.fx_speed_check import slow_fx_layers
    from ptqflow.models.graph.fx_prep import classifier_head

    skip = set(classifier_head(source) if config.float_head else [])
    skip |= set(fp32_module_names(source, config, onnx_proto) if onnx_proto is not None else [])
    return slow_fx_layers(source, example, config.backend, skip)


def _check_kernels_accept(source, mapping, backend_config, example, config: PytorchFxConfig) -> None:
    """Convert once after a single example batch: the kernel library refuses unsupported dtypes at weight-packing
    time, and finding that out should not cost a full calibration."""
    if config.weight_dtype == "qint8":
        return
    import torch
    from torch.ao.quantization.quantize_fx import convert_fx

    probe = prepare_traced(source, mapping, example, backend_config)
    with torch.no_grad():
        probe(example)
    try:
        convert_fx(probe, backend_config=backend_config)
    except RuntimeError as exc:
        raise UnsupportedVariant(f"{config.backend} cannot pack {config.weight_dtype} weights: "
                                 f"{first_line(exc)}") from exc


@dataclass
class FxGraphs:
    """The FX stages of one quantization: the graph-prepared FP32 module, the observed module after calibration and
    the converted int8 module (what numeric-suite tools compare), with the mapping and backend config that made them.
    Use them under `torch.backends.quantized.engine = config.backend`."""

    source: object  # torch.fx.GraphModule, FP32
    prepared: object  # observed and calibrated
    converted: object  # int8
    mapping: object  # QConfigMapping
    backend_config: object
    example: object  # torch.Tensor the graphs were traced with
    calibration_images: int
    # modules FX could not trace, kept in float (fx_prep.untraceable_modules): name -> why
    float_leaves: dict = field(default_factory=dict)
    # layers the int8 engine computed away from their quantization (engine_check): module name -> share off
    engine_departures: dict = field(default_factory=dict)
    engine_shares: dict = field(default_factory=dict)  # every int8 layer's share off, however small
    fusion_fallback: str = ""  # prepare_checked's fallback, when it took one
    speed_kept: dict = field(default_factory=dict)  # convolutions kept float for speed (speed_kept): name -> why
    # layers kept float where the engine computes them inexactly (fx_exactness.inexact_layers): name -> why
    inexact_kept: dict = field(default_factory=dict)


def speed_kept_layers(float_model: FloatModel, config: PytorchFxConfig, calibration: np.ndarray) -> dict[str, str]:
    """What quantize_graphs' speed check keeps in float for `config`, found without quantizing (the MAC share is
    recorded before): the graph-prepared `float_model` timed layer by layer. Timings depend on shapes only, which
    its equalized and AdaRounded forms share."""
    if not _times_layers(config):
        return {}
    from ptqflow.models.graph.fx_prep import prepare_graph

    example = _example(float_model, calibration)
    source = prepare_graph(float_model.torch_module, example_input=example)
    return speed_kept(source, config, example, float_model.onnx.proto)


def _times_layers(config: PytorchFxConfig) -> bool:
    """Whether `config`'s speed check runs: it times the graph-prepared module's qint8 convolutions."""
    return config.speed_check and config.graph_preparation and config.weight_dtype == "qint8"


def _example(float_model: FloatModel, calibration: np.ndarray):
    """The batch FX traces and prepares with: the model's fixed batch size (1), else two images."""
    import torch

    return torch.from_numpy(calibration[:float_model.onnx.input.batch_size or 2])


def _source_and_mapping(float_model: FloatModel, config: PytorchFxConfig, example, inexact: Sequence[str] = ()):
    """The graph-prepared module, its QConfigMapping and the convolutions the speed check keeps float (with why);
    the layers `inexact` (fx_exactness.inexact_layers) stay float too."""
    source = float_model.torch_module
    if config.graph_preparation:
        from ptqflow.models.graph.fx_prep import prepare_graph

        source = prepare_graph(source, example_input=example)
    slower = speed_kept(source, config, example, float_model.onnx.proto)
    return source, _qconfig_mapping(config, source, float_model.onnx.proto, [*slower, *inexact]), slower


@contextlib.contextmanager
def fx_quantization(backend: str):
    """torch's quantized engine set to `backend`, and FX's tracer told not to record each node's Python stack: the
    first symbolized stack imports torch._inductor and torch._dynamo (2 s, nothing else here needs them), and the
    stacks only feed error messages (torch.fx.config.do_not_emit_stack_traces). Both are restored after."""
    import torch
    import torch.fx.config

    previous = torch.backends.quantized.engine, torch.fx.config.do_not_emit_stack_traces
    torch.backends.quantized.engine = backend
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.backends.quantized.engine, torch.fx.config.do_not_emit_stack_traces = previous


def prepare_traced(source, mapping, example, backend_config, leaves: list[str] | None = None):
    """prepare_fx of a copy of `source`, with the modules FX cannot trace through (fx_prep.untraceable_modules: an
    onnx2torch forward that branches on its tensors) kept as leaves that run in float, rather than failing the
    whole variant on one op."""

    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    from ptqflow.models.graph.fx_prep import untraceable_modules

    if leaves is None:
        leaves = list(untraceable_modules(source)) if hasattr(source, "graph") else []
    custom = PrepareCustomConfig().set_non_traceable_module_names(leaves)
    return prepare_fx(copy.deepcopy(source), mapping, example_inputs=(example,), prepare_custom_config=custom,
                      backend_config=backend_config)


def prepare_reference(float_model: FloatModel, config: PytorchFxConfig, example, inexact: Sequence[str] = ()):
    """`float_model` prepared (not calibrated) exactly as `quantize_graphs` prepares the model it quantizes (with
    its FxGraphs.inexact_kept as `inexact`): the FP32 side of a numeric-suite comparison, with the same modules,
    fusions and float parts."""
    source, mapping, _ = _source_and_mapping(float_model.ready_for(config), config, example, inexact)
    with fx_quantization(config.backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_checked(source, mapping, example, config)[0]


# The observer state of the last calibration, by _calibration_key: the sweep's two FX variants (fbgemm, x86) prepare
# the same observed graph, with the same weights and observers, and calibrate it on the same images.
_LAST_CALIBRATION: dict[str, tuple[dict, int]] = {}


def _calibration_key(prepared, calibration: np.ndarray, batch_size: int) -> str:
    """Everything that shapes the observers' state after calibration: the observed graph's code, each module's type
    and plain settings (observer dtype, qscheme, range, percentile, ...), every parameter and buffer (weights and the
    observers' initial state), the images' bytes and the batch size."""
    import hashlib

    import torch

    digest = hashlib.sha256(prepared.code.encode())
    for name, module in prepared.named_modules():
        digest.update(f"\0{name}\0{type(module).__module__}.{type(module).__qualname__}".encode())
        for attribute, value in sorted(vars(module).items()):
            plain = (bool, int, float, str, torch.dtype, torch.qscheme)
            if value is None or isinstance(value, plain) or (
                    isinstance(value, tuple) and all(isinstance(v, plain) for v in value)):  # a clip's bounds
                digest.update(f"\0{attribute}={value!r}".encode())
    update_with_tensors(digest, prepared.state_dict().items())
    digest.update(f"\0{array_sha256(calibration)}\0{batch_size}".encode())
    return digest.hexdigest()


def _calibrate(prepared, calibration: np.ndarray, batch_size: int, advance: Callable[[int], None]) -> int:
    """Run the calibration images through `prepared`'s observers, or give them the state the same calibration of the
    same observed graph left (see _LAST_CALIBRATION); returns the number of images seen."""
    import torch

    key = _calibration_key(prepared, calibration, batch_size)
    if key in _LAST_CALIBRATION:
        state, seen = _LAST_CALIBRATION[key]
        prepared.load_state_dict(state)
        advance(seen)
        return seen
    seen = 0
    with torch.no_grad():  # observers update their buffers in place
        for batch in batches(calibration, batch_size):
            prepared(torch.from_numpy(batch))
            seen += len(batch)
            advance(len(batch))
    _LAST_CALIBRATION.clear()
    _LAST_CALIBRATION[key] = ({name: value.detach().clone() for name, value in prepared.state_dict().items()}, seen)
    return seen


def quantize_graphs(float_model: FloatModel, config: PytorchFxConfig, calibration: np.ndarray,
                    advance: Callable[[int], None] = lambda n: None) -> FxGraphs:
    """prepare_fx, calibration on model-ready `calibration` inputs and convert_fx of the onnx2torch module (equalized
    first when `config.equalization` asks for it and `float_model` is not yet), with the int8 layers the engine
    computes wrongly (engine_check, once, for the file and its diagnosis). Raises UnsupportedVariant when the
    kernels refuse the dtypes."""

    from torch.ao.quantization.quantize_fx import convert_fx

    from ptqflow.models.backends.engine_check import CHECKED_IMAGES, departures, engine_shares, overwritten_residuals
    from ptqflow.models.backends.fx_qconfig import observe_whole_input_range
    from ptqflow.models.graph.fx_prep import untraceable_modules

    float_model = float_model.ready_for(config, calibration)
    fixed = float_model.onnx.input.batch_size  # a fixed batch dimension (1) runs everything at that size
    example = _example(float_model, calibration)
    inexact = inexact_layers(float_model, config, calibration, quantize_graphs)
    source, mapping, slower = _source_and_mapping(float_model, config, example, list(inexact))
    with fx_quantization(config.backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices on every call
        _check_kernels_accept(source, mapping, _backend_config(config), example, config)
        float_leaves = untraceable_modules(source) if hasattr(source, "graph") else {}
        prepared, backend_config, fallback = prepare_checked(source, mapping, example, config, list(float_leaves))
        if config.whole_input_range:
            observe_whole_input_range(prepared)
        seen = _calibrate(prepared, calibration, fixed or config.calibration_batch_size, advance)
        converted = convert_fx(copy.deepcopy(prepared), backend_config=backend_config)
        overwritten = overwritten_residuals(converted)
        if overwritten:
            raise UnsupportedVariant(f"{config.backend} fuses {', '.join(overwritten)} with a residual Add whose input "
                                     "another layer reads afterwards, and its kernel writes the sum into that input")
        graphs = FxGraphs(source, prepared, converted, mapping, backend_config, example, seen, float_leaves,
                          fusion_fallback=fallback, speed_kept=slower, inexact_kept=inexact)
        graphs.engine_shares = engine_shares(graphs, calibration, fixed or CHECKED_IMAGES)
        graphs.engine_departures = departures(graphs.engine_shares)
    return graphs


def quantize(float_model: FloatModel, config: PytorchFxConfig, calibration: np.ndarray, out_dir: Path,
             advance: Callable[[int], None] = lambda n: None) -> QuantizedModel:
    """Quantize the onnx2torch module with `config`, calibrating on model-ready `calibration` inputs, and save the
    traced TorchScript as out_dir/model.pt. Raises UnsupportedVariant when the kernels refuse the dtypes."""
    import torch

    graphs = quantize_graphs(float_model, config, calibration, advance)
    with fx_quantization(config.backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            # check_trace traces a second time to catch Python control flow that depends on the input: the code of
            # an FX GraphModule has none (and the sweep evaluates the saved file against FP32). 0.5 s per variant.
            traced = torch.jit.trace(graphs.converted, graphs.example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    path = out_dir / MODEL_FILE_NAME
    write_atomic(path, buffer.getvalue())
    return QuantizedModel(path=path, format="torchscript", calibration_images=graphs.calibration_images,
                          graphs=graphs, kept_float={**graphs.float_leaves, **graphs.speed_kept, **graphs.inexact_kept},
                          engine_departures=dict(graphs.engine_departures), fusion_fallback=graphs.fusion_fallback)
