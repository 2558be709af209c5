"""Diagnosis of a PyTorch FX int8 model with torch.ao.ns's numeric suite: weight, accumulated and local (shadowed)
SQNR per layer of the ONNX model both graphs were converted from."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings
from pathlib import Path

import numpy as np

from ptqflow.models.diagnosis.activations import input_channel_ranges
from ptqflow.models.diagnosis.records import BATCH_SIZE, Diagnosis, float_reasons, layer_rows, short_names
from ptqflow.models.diagnosis.sqnr import Power
from ptqflow.models.graph.layer_map import Layer, layer_table, node_for_name


def _as_float(value):
    return value.dequantize() if value.is_quantized else value


def _clear(*modules) -> None:
    import torch.ao.ns._numeric_suite_fx as ns

    for module in modules:
        for logger in module.modules():
            if isinstance(logger, ns.OutputLogger):
                logger.stats = []


@functools.cache
def _copying_logger():
    """torch.ao.ns's OutputLogger, logging a copy of what it sees: onednn's fused conv + residual Add writes its sum
    into the residual's buffer, so a layer whose output is that residual would otherwise show the sum."""
    import torch.ao.ns._numeric_suite_fx as ns

    class CopyingOutputLogger(ns.OutputLogger):
        def forward(self, x):
            super().forward(x.clone() if hasattr(x, "clone") else x)
            return x

    return CopyingOutputLogger


def _module_behind(graph_module, node) -> str | None:
    """The module a logged node stands for: the node's own module, or behind observers the module they observe."""
    from torch.ao.quantization import ObserverBase

    while node is not None and node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if not isinstance(module, ObserverBase):
            return node.target
        node = node.args[0] if node.args else None
    return None


_PASSTHROUGH = ("Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Cast")


def _fed_by_model_input(model, layers: list[Layer]) -> set[str]:
    """Layers whose input is the model input, through shape-only ops."""
    producer = {name: node for node in model.graph.node for name in node.output}
    inputs = {value.name for value in model.graph.input}
    fed = set()
    for layer in layers:
        tensor = layer.input
        while tensor in producer and producer[tensor].op_type in _PASSTHROUGH:
            tensor = producer[tensor].input[0]
        if tensor in inputs:
            fed.add(layer.name)
    return fed


def _unobserved(prepared):
    """A copy of a prepared FP32 model whose observers only pass values through: its qparams are never used here
    (it is the FP32 side of the comparisons), and observers such as fx_qconfig.PercentileObserver sort every
    activation they see."""
    from torch.ao.quantization import ObserverBase

    copied = copy.deepcopy(prepared)
    for module in copied.modules():
        if isinstance(module, ObserverBase):
            module.forward = _identity
    return copied


def _identity(x):
    return x


def _unshadowable() -> dict:
    """torch.ao.ns's unmatchable types plus HardSwish: its quantized kernel takes only a quantized input, and the
    shadow copy is handed the FP32 one (no input qparams to quantize it with), which stops the whole diagnosis. Such
    a layer gets its accumulated SQNR, not a local one, and the diagnosis says so."""
    import torch
    from torch.ao.ns.fx.mappings import get_unmatchable_types_map

    types = get_unmatchable_types_map()
    types["mods_unmatchable"] = types["mods_unmatchable"] | {torch.nn.Hardswish, torch.ao.nn.quantized.Hardswish}
    types["funs_unmatchable"] = types["funs_unmatchable"] | {torch.nn.functional.hardswish}
    return types


@functools.cache
def _reversed_fusions() -> list:
    from torch.ao.ns.fx.pattern_utils import get_reversed_fusions

    return get_reversed_fusions()


@contextlib.contextmanager
def _fusion_patterns_built_once():
    """torch.ao.ns's graph matcher calls get_reversed_fusions() for every node it visits, and each call builds the
    pattern table of torch's native backend config anew (2.4 s of a ResNet8 sweep's 4.8 s of FX diagnosis). The
    table depends on nothing else, and the matcher only iterates over it: built once, it is the same table."""
    import torch.ao.ns.fx.graph_matcher as matcher

    original = matcher.get_reversed_fusions
    matcher.get_reversed_fusions = _reversed_fusions
    try:
        yield
    finally:
        matcher.get_reversed_fusions = original


def _fused_adds(quantized, onnx_model) -> dict[str, str]:
    """ONNX Add node -> why it has no row of its own: onednn's conv + residual Add modules (ConvAdd2d,
    ConvAddReLU2d) compute it inside the convolution's int8 kernel, so it is measured with that layer."""
    from torch.ao.nn.intrinsic.quantized import ConvAdd2d, ConvAddReLU2d

    names = [node.name for node in onnx_model.graph.node]
    readers: dict[str, list] = {}
    for node in onnx_model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    by_name = {node.name: node for node in onnx_model.graph.node}
    fused = {}
    for module_name, module in quantized.named_modules():
        conv = by_name.get(node_for_name(module_name, names) or "")
        if not isinstance(module, (ConvAdd2d, ConvAddReLU2d)) or conv is None:
            continue
        for add in (r for r in readers.get(conv.output[0], []) if r.op_type == "Add"):
            fused[add.name] = f"int8 inside {conv.name}'s kernel (onednn conv + Add): measured with that layer"
    return fused


def _float_reasons(layers, is_quantized: dict, module_reasons: dict[str, str], names: list[str],
                   node_reasons: dict[str, str]) -> dict[str, str]:
    """Why each layer FX did not quantize is in float (records.float_reasons), from the reasons by FX module and
    by ONNX node."""
    by_node = {node_for_name(module, names): why for module, why in module_reasons.items()}
    by_node.update(node_reasons)
    return float_reasons(layers, is_quantized, {node: why for node, why in by_node.items() if node},
                         unmapped="no FX module maps to it (FX runs it as a function): not measured",
                         otherwise="FX ran it in float (no int8 pattern for it in the backend config)")


def _worst_by_layer(by_module: dict[str, float], layer_of) -> dict[str, float]:
    """The largest value of each layer's modules, by layer name (`layer_of` maps an FX module to its layer)."""
    worst: dict[str, float] = {}
    for module, value in by_module.items():
        layer, _ = layer_of(module)
        if layer is not None:
            worst[layer.name] = max(value, worst.get(layer.name, 0.0))
    return worst


def _notes(layers, rows, is_quantized: dict) -> tuple[str, ...]:
    """What the table cannot show: no quantized module mapped at all (a failure of the layer map), or layers the
    numeric suite could not shadow."""
    notes = ()
    if layers and not any(is_quantized.values()):
        notes += ("no quantized FX module was mapped to a layer of the ONNX model: this table is a failure of the "
                  "layer map (ptqflow.models.graph.layer_map.node_for_name), not a model without int8 layers",)
    unshadowed = [r.layer for r in rows if r.quantized and r.local_sqnr_db is None]
    if unshadowed:
        notes += (f"no local SQNR for {', '.join(short_names(unshadowed).values())}: add_shadow_loggers cannot "
                  "shadow that pattern (e.g. quantized add_relu, hardswish, onednn's conv fused with a residual "
                  "Add)",)
    return notes


def diagnose_fx_graphs(reference_prepared, quantized, images: np.ndarray, onnx_model, backend: str,
                       float_onnx_path: Path | None = None, batch_size: int = BATCH_SIZE,
                       module_reasons: dict | None = None, module_departures: dict | None = None) -> Diagnosis:
    """Diagnose an FX-converted `quantized` GraphModule against `reference_prepared`, the FP32 model prepared the same
    way (quantize_pytorch.prepare_reference). Rows are the layers of `onnx_model` (the ONNX model both were converted
    from), FX modules mapped back to its nodes. `float_onnx_path` (that model's file) adds each layer's input channel
    ranges. Runs under torch's quantized engine `backend`. By FX module: why it runs in float (`module_reasons`), the
    share of its outputs the engine computes wrongly (`module_departures`, engine_check)."""
    import torch
    import torch.ao.ns._numeric_suite_fx as ns
    from torch.ao.ns.fx.utils import compute_sqnr

    from ptqflow.models.backends.pytorch_fx import fx_quantization
    layers = layer_table(onnx_model)
    names = [node.name for node in onnx_model.graph.node]
    by_node = {node: layer for layer in layers for node in layer.nodes}

    def layer_of(fqn: str | None) -> tuple[Layer | None, int]:
        if not fqn:
            return None, -1
        node = node_for_name(fqn, names)
        layer = by_node.get(node)
        return layer, (layer.nodes.index(node) if layer else -1)

    weight, is_quantized = {}, {}
    local, accumulated, depth = {}, {}, {}
    with fx_quantization(backend):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _fusion_patterns_built_once():
            # (stdout: add_shadow_loggers prints each pattern it cannot shadow, e.g. add_relu)
            warnings.simplefilter("ignore")
            weights = ns.extract_weights("fp32", reference_prepared, "int8", quantized)
            ns.extend_logger_results_with_comparison(weights, "fp32", "int8", compute_sqnr, "sqnr")
            for by_kind in weights.values():
                for entry in by_kind.get("weight", {}).get("int8", []):
                    layer, _ = layer_of(entry.get("fqn"))
                    if layer is not None and entry.get("sqnr"):
                        weight[layer.name] = float(entry["sqnr"][0])
            reference_prepared = _unobserved(reference_prepared)
            float_logged, int8_logged = ns.add_loggers("fp32", copy.deepcopy(reference_prepared), "int8",
                                                       copy.deepcopy(quantized), _copying_logger())
            # int8 shadows fp32 (not the other way round): each quantized layer gets the FP32 model's input to it,
            # quantized with the layer's own input qparams, and is compared with the FP32 layer's output.
            shadowed = ns.add_shadow_loggers("int8", copy.deepcopy(quantized), "fp32",
                                             copy.deepcopy(reference_prepared), _copying_logger(),
                                             unmatchable_types_map=_unshadowable())
            nodes = {node.name: node for node in shadowed.graph.nodes}

            def record(target: dict, layer: Layer, position: int, reference, value) -> None:
                key = (id(target), layer.name)
                if depth.get(key, -1) > position:
                    return  # an earlier node of the layer: the output of its fused Relu is what counts
                if depth.get(key, -1) < position:
                    target[layer.name] = Power()
                    depth[key] = position
                target[layer.name].add(_as_float(reference).numpy(), _as_float(value).numpy())

            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    x = torch.from_numpy(images[start:start + batch_size])
                    float_logged(x)
                    int8_logged(x)
                    shadowed(x)
                    logged = ns.extract_logger_info(float_logged, int8_logged, ns.OutputLogger, "int8")
                    for by_kind in logged.values():
                        outputs = by_kind.get("node_output", {})
                        for ref, ours in zip(outputs.get("fp32", []), outputs.get("int8", [])):
                            layer, position = layer_of(ours.get("fqn"))
                            if layer is not None and ours["values"]:
                                is_quantized[layer.name] = bool(ours["values"][-1].is_quantized)
                                record(accumulated, layer, position, ref["values"][-1], ours["values"][-1])
                    shadow = ns.extract_shadow_logger_info(shadowed, ns.OutputLogger, "fp32")
                    for name, by_kind in shadow.items():
                        outputs = by_kind.get("node_output", {})
                        layer, position = layer_of(_module_behind(shadowed, nodes.get(name)))
                        for ref, ours in zip(outputs.get("fp32", []), outputs.get("int8", [])):
                            if layer is not None and ours["values"]:
                                record(local, layer, position, ref["values"][-1], ours["values"][-1])
                    _clear(float_logged, int8_logged, shadowed)
    fed_by_input = _fed_by_model_input(onnx_model, layers)
    for layer in layers:
        if layer.name not in local and layer.name in accumulated and layer.name in fed_by_input:
            # add_shadow_loggers finds no input qparams behind a permute of the model input; for a layer fed by the
            # model input, the FP32 model's input to it is the quantized model's: local is accumulated.
            local[layer.name] = accumulated[layer.name]
    ranges = input_channel_ranges(float_onnx_path, images, layers, batch_size) if float_onnx_path else {}
    method = ("torch.ao.ns._numeric_suite_fx: extract_weights (weight SQNR), add_loggers (accumulated SQNR), "
              "add_shadow_loggers with int8 shadowing fp32 (local SQNR: each quantized layer run on the FP32 "
              "model's input to it)")
    rows = layer_rows(layers, weight, local, accumulated, ranges, is_quantized,
                      _float_reasons(layers, is_quantized, module_reasons or {}, names,
                                     _fused_adds(quantized, onnx_model)),
                      _worst_by_layer(module_departures or {}, layer_of))
    return Diagnosis("pytorch-fx", method, len(images), rows, _notes(layers, rows, is_quantized))


def diagnose_fx(reference, source, config, calibration: np.ndarray, images: np.ndarray, graphs=None,
                batch_size: int = BATCH_SIZE) -> Diagnosis:
    """Diagnose a PyTorch FX variant: `reference` is the FP32 FloatModel before AdaRound, `source` the one the
    quantizer reads (AdaRound-ed when the config asks for it; see FloatModel.for_config). Quantizes `source` with
    `config` and `calibration` the way quantize_pytorch.quantize does, unless `graphs` (its FxGraphs) are given."""
    from ptqflow.models.backends.pytorch_fx import prepare_reference, quantize_graphs

    graphs = graphs or quantize_graphs(source, config, calibration)
    reference = reference.ready_for(config)
    prepared = prepare_reference(reference, config, graphs.example, list(graphs.inexact_kept))
    return diagnose_fx_graphs(prepared, graphs.converted, images, reference.onnx.proto, config.backend,
                              float_onnx_path=reference.onnx.path, batch_size=batch_size,
                              module_reasons=recipe_float_modules(graphs, config, reference.onnx.proto),
                              module_departures=graphs.engine_departures)


def recipe_float_modules(graphs, config, onnx_proto) -> dict[str, str]:
    """The FX modules a PyTorch FX variant ran in FP32, each with why: what the tracer could not trace, the recipe's
    FP32 layers, its float classifier head, what its speed check found slower in int8 and where fbgemm saturates."""
    from ptqflow.models.backends.pytorch_fx import fp32_module_names
    from ptqflow.models.graph.fx_prep import classifier_head

    reasons = {name: f"FX could not trace it ({why})" for name, why in graphs.float_leaves.items()}
    reasons.update({name: why for name, why in {**graphs.speed_kept, **graphs.inexact_kept}.items()
                    if name not in reasons})
    if hasattr(graphs.source, "graph"):
        for name in fp32_module_names(graphs.source, config, onnx_proto):
            reasons.setdefault(name, "kept in FP32 by the recipe (its FP32 layers)")
        if getattr(config, "float_head", False):
            for name in classifier_head(graphs.source):
                reasons.setdefault(name, "the recipe keeps the classifier head in float (8-bit logits tie)")
    return reasons
