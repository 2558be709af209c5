"""Diagnosis of an onnxruntime QDQ model with onnxruntime's qdq_loss_debug: weight and accumulated SQNR per layer,
and local SQNR from each layer's Q/DQ subgraph run on the FP32 model's activations. QOperator models are diagnosed
through their QDQ twin (`diagnose_ort_config`)."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ptqflow.models.diagnosis.activations import (
    ActivationReader,
    ChannelRange,
    add_channel_ranges,
    augmented_model,
    model_input_name,
    session_options,
    unflatten,
)
from ptqflow.models.diagnosis.records import BATCH_SIZE, Diagnosis, float_reasons, layer_rows
from ptqflow.models.diagnosis.sqnr import Power, energy, flat64
from ptqflow.models.graph.layer_map import Layer, layer_table, node_for_name, tensor_shapes


_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _subgraph(model, inputs: list[str], output: str):
    """The nodes of `model` that compute `output` from `inputs` (and initializers), as a model of their own."""
    import onnx
    from onnx import helper

    producer = {name: node for node in model.graph.node for name in node.output if name}
    initializers = {init.name: init for init in model.graph.initializer}
    stop, chosen, seen, todo = set(inputs), [], set(), [output]
    while todo:
        name = todo.pop()
        if name in stop or name in initializers or name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None:
            return None  # reaches a graph input that is not among `inputs`
        if id(node) not in {id(n) for n in chosen}:
            chosen.append(node)
            todo.extend(n for n in node.input if n)
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    chosen.sort(key=lambda node: order[id(node)])
    used = {n for node in chosen for n in node.input}
    graph = helper.make_graph(
        chosen, "layer", [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
        [init for name, init in initializers.items() if name in used])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return sub


class _QdqGraph:
    """Walks of a QDQ model: from a tensor back to the float tensor its Q/DQ chain starts from, and forward to its
    dequantized value."""

    def __init__(self, model):
        self.model = model
        self.producer = {name: node for node in model.graph.node for name in node.output if name}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name for init in model.graph.initializer}
        self.tensors = set(self.producer) | {v.name for v in model.graph.input}

    def float_source(self, tensor: str) -> str:
        while tensor in self.producer and self.producer[tensor].op_type in _QDQ_OPS:
            tensor = self.producer[tensor].input[0]
        return tensor

    def dequantized(self, tensor: str) -> str:
        """The first DequantizeLinear output after `tensor`'s QuantizeLinear, or `tensor` when it stays float."""
        for q in self.consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return tensor

    def weight_name(self, node) -> str | None:
        if len(node.input) < 2:
            return None
        dq = self.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.initializers:
            return None
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

        name = dq.input[0]
        return name[:-len(TENSOR_NAME_QUANT_SUFFIX)] if name.endswith(TENSOR_NAME_QUANT_SUFFIX) else name


def _unsigned_weights_fixed(matched: dict, qdq) -> dict:
    """`create_weight_matching`'s result with uint8 weights dequantized right: onnxruntime 1.32 computes
    `(weight - zero_point) * scale` in the integers' own dtype, so a uint8 weight below its zero point wraps around
    (ort-uint8 on ResNet8 showed -17 dB for weights that cost it 0.2 points of agreement). Signed weights are left as
    the library computed them."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in qdq.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        values = numpy_helper.to_array(initializers[node.input[0]])
        name = node.input[0].removesuffix("_quantized")  # onnxruntime's TENSOR_NAME_QUANT_SUFFIX
        if values.dtype != np.uint8 or name not in matched:
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.int64) if len(node.input) > 2
                else np.zeros(scale.shape, dtype=np.int64))
        if scale.size > 1:  # per channel: scale and zero point along `axis`
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        matched[name]["dequantized"] = ((values.astype(np.int64) - zero) * scale).astype(np.float32)
    return matched


def _compute_nodes(qdq, layers: list[Layer], naming) -> dict:
    """Layer name -> its compute node in the QDQ model: the node that stands for the layer's first node of `naming`
    (the model that names the layers)."""
    names = [node.name for node in naming.graph.node]
    known = set(names)
    by_node = {node: layer for layer in layers for node in layer.nodes}
    compute = {}
    for node in qdq.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        original = node.name if node.name in known else node_for_name(node.name, names)
        layer = by_node.get(original)
        if layer is not None and layer.name not in compute and layer.nodes[0] == original:
            compute[layer.name] = node
    return compute


def _weight_errors(float_onnx_path: Path, qdq_onnx_path: Path, qdq) -> dict:
    """Weight SQNR by weight name, from create_weight_matching (uint8 weights dequantized right)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_weight_error, create_weight_matching

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_weight_error(_unsigned_weights_fixed(
            create_weight_matching(str(float_onnx_path), str(qdq_onnx_path)), qdq))


def _layer_plans(layers: list[Layer], compute: dict, walk: _QdqGraph, weight_errors: dict,
                 float_tensors: set[str]) -> tuple[dict, dict, dict]:
    """(weight SQNR, whether the backend quantized it, plan) by layer name, for each layer with a compute node. A
    plan is (its output tensor in the FP32 model, that tensor's dequantized value in the QDQ model, the float tensors
    its Q/DQ subgraph starts from)."""
    weight, quantized, plans = {}, {}, {}
    for layer in layers:
        node = compute.get(layer.name)
        if node is None:
            continue
        w = walk.weight_name(node)
        # quantized: its weights are dequantized from integers, or (an Add) its output is quantized; an excluded
        # node may still read dequantized inputs
        quantized[layer.name] = w is not None or walk.dequantized(node.output[0]) != node.output[0]
        if w is not None and w in weight_errors:
            weight[layer.name] = weight_errors[w]
        out = layer.output if layer.output in walk.tensors and layer.output in float_tensors else node.output[0]
        if out not in float_tensors:
            continue
        inputs = list(dict.fromkeys(walk.float_source(name) for name in node.input
                                    if name and walk.float_source(name) not in walk.initializers))
        plans[layer.name] = (out, walk.dequantized(out), inputs)
    return weight, quantized, plans


def _local_sessions(qdq, plans: dict, float_tensors: set[str]) -> dict:
    """Layer name -> an onnxruntime session of its Q/DQ subgraph, for each plan whose inputs the FP32 model has."""
    import onnxruntime as ort

    options = session_options()  # graph optimization off: the Q/DQ run as written
    sessions = {}
    for name, (out, dequantized, inputs) in plans.items():
        if not all(i in float_tensors for i in inputs):
            continue
        sub = _subgraph(qdq, inputs, dequantized)
        if sub is not None:
            sessions[name] = ort.InferenceSession(sub.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"])
    return sessions


def _add_batch(plans: dict, sessions: dict, local: dict, accumulated: dict, float_acts: dict, qdq_acts: dict,
               matching: dict, shapes: dict, images: int) -> None:
    """Add one batch of `images` to each planned layer's accumulated SQNR (the QDQ model's value against the FP32
    model's) and, with a session, its local SQNR (its Q/DQ subgraph run on the FP32 model's inputs to it)."""
    for name, (out, dequantized, inputs) in plans.items():
        compared = []  # (power, the QDQ side) of the comparisons with float_acts[out]
        match = matching.get(out)
        if match is not None and "float" in match:  # its "float" side is float_acts[out], passed through
            compared.append((accumulated[name], match["post_qdq"][0]))
        elif out in qdq_acts and out in float_acts:  # a layer left in FP32: its output is not QDQ-ed
            compared.append((accumulated[name], qdq_acts[dequantized if dequantized in qdq_acts else out]))
        if name in sessions:
            feeds = {i: unflatten(float_acts[i], shapes.get(i), images) for i in inputs}
            if all(v is not None for v in feeds.values()):
                compared.append((local[name], sessions[name].run(None, feeds)[0]))
        if compared:  # the FP32 side converted and its energy summed once for both comparisons
            flat = flat64(float_acts[out])
            signal = energy(flat)
            for power, other in compared:
                power.add(flat, other, signal)


def _measure(float_onnx_path: Path, qdq_onnx_path: Path, reference, images: np.ndarray, batch_size: int,
             layers: list[Layer], plans: dict, sessions: dict) -> tuple[dict, dict, dict]:
    """(local SQNR, accumulated SQNR, input channel ranges) by layer name, over `images` batch by batch: both models'
    intermediate tensors collected as collect_activations collects them, matched by create_activation_matching."""
    from onnxruntime.quantization.qdq_loss_debug import create_activation_matching

    shapes = tensor_shapes(reference)
    local = {name: Power() for name in sessions}
    accumulated = {name: Power() for name in plans}
    ranges = {layer.name: ChannelRange() for layer in layers}
    input_name = model_input_name(reference)
    with tempfile.TemporaryDirectory(prefix="ptqflow-diagnosis-") as scratch:
        collect_float = ActivationReader(augmented_model(float_onnx_path, Path(scratch) / "float_augmented.onnx"),
                                         input_name)
        collect_qdq = ActivationReader(augmented_model(qdq_onnx_path, Path(scratch) / "qdq_augmented.onnx"),
                                       input_name)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            float_acts = collect_float(batch)
            qdq_acts = collect_qdq(batch)
            matching = create_activation_matching({k: [v] for k, v in qdq_acts.items()},
                                                  {k: [v] for k, v in float_acts.items()})
            _add_batch(plans, sessions, local, accumulated, float_acts, qdq_acts, matching, shapes, len(batch))
            add_channel_ranges(ranges, layers, float_acts, shapes, len(batch))
    return local, accumulated, ranges


def diagnose_ort(float_onnx_path: Path, qdq_onnx_path: Path, images: np.ndarray, *, layers_model=None,
                 batch_size: int = BATCH_SIZE, method: str | None = None,
                 node_reasons: dict[str, str] | None = None) -> Diagnosis:
    """Diagnose a QDQ model against the FP32 model it was quantized from (`float_onnx_path`: the model quantize_static
    read, i.e. after onnxruntime's pre-processing, whose tensor and weight names the QDQ model keeps). Layers are
    named after `layers_model` (an onnx.ModelProto; default: the float model), e.g. the FP32 model before
    pre-processing, so FX and onnxruntime rows share names. `images` are model-ready inputs. `node_reasons`: why
    the recipe kept nodes in FP32, by node name (recipe_float_nodes), for the rows of layers left in float."""
    import onnx

    float_onnx_path, qdq_onnx_path = Path(float_onnx_path), Path(qdq_onnx_path)
    reference = onnx.load(str(float_onnx_path))
    qdq = onnx.load(str(qdq_onnx_path))
    naming = layers_model if layers_model is not None else reference
    layers = layer_table(naming)
    compute = _compute_nodes(qdq, layers, naming)
    float_tensors = {name for node in reference.graph.node for name in node.output} | {
        v.name for v in reference.graph.input}
    weight_errors = _weight_errors(float_onnx_path, qdq_onnx_path, qdq)
    weight, quantized, plans = _layer_plans(layers, compute, _QdqGraph(qdq), weight_errors, float_tensors)
    sessions = _local_sessions(qdq, plans, float_tensors)
    local, accumulated, ranges = _measure(float_onnx_path, qdq_onnx_path, reference, images, batch_size, layers,
                                          plans, sessions)
    reasons = float_reasons(layers, quantized, node_reasons or {}, unmapped="no node of it in the quantized model",
                            otherwise="onnxruntime left it in float (no int8 kernel for it in this format)")
    return Diagnosis("onnxruntime", method or _ORT_METHOD, len(images),
                     layer_rows(layers, weight, local, accumulated, ranges, quantized, reasons))


def recipe_float_nodes(reference, config) -> dict[str, str]:
    """The ONNX nodes of `reference` (ModelProto) an onnxruntime `config` keeps in FP32, each with why."""
    from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes
    from ptqflow.models.graph.layer_map import layer_nodes

    from ptqflow.models.backends.speed_check import slow_int8_layers

    reasons = {}
    if config.fp32_nodes:
        reasons.update(dict.fromkeys(layer_nodes(reference, config.fp32_nodes, "fp32_nodes"),
                                     "kept in FP32 by the recipe (its FP32 layers)"))
    if config.float_head:
        for node in onnx_classifier_head_nodes(reference):
            reasons.setdefault(node, "the recipe keeps the classifier head in float (8-bit logits tie)")
    for layer in slow_int8_layers(reference, config, skip=set(reasons)):
        reasons[layer.node] = layer.reason
    return reasons


_ORT_METHOD = ("onnxruntime.quantization.qdq_loss_debug (create_weight_matching; collect_activations + "
               "create_activation_matching for accumulated SQNR); local SQNR: each layer's Q/DQ subgraph of the QDQ "
               "model run on the FP32 model's activations")
_ORT_TWIN_METHOD = ("QDQ twin of this {format} model (the same config with quant_format=QDQ): "
                    "onnxruntime.quantization.qdq_loss_debug (create_weight_matching; collect_activations + "
                    "create_activation_matching); local SQNR: each layer's Q/DQ subgraph run on the FP32 model's "
                    "activations")


def diagnose_ort_config(reference, source, config, calibration: np.ndarray, images: np.ndarray, work_dir: Path,
                        qdq_path: Path | None = None, batch_size: int = BATCH_SIZE,
                        memo: dict | None = None) -> Diagnosis:
    """Diagnose an onnxruntime variant: `reference` is the FP32 FloatModel before AdaRound, `source` the one the
    quantizer read (AdaRound-ed when the config asks for it; see FloatModel.for_config). A QDQ config diagnoses
    `qdq_path` when given (e.g. the logged model) or quantizes `source` with `calibration`; a QOperator config is
    diagnosed through its QDQ twin (the same config with quant_format QDQ), quantized here.

    `memo` (a dict the caller keeps, e.g. for one sweep) holds diagnoses by the QDQ file's SHA-256, the FP32 model
    (which names the layers; its onnxruntime-ready form is made from it) and the images: a QOperator variant whose
    twin is byte for byte a QDQ variant already diagnosed (ort-int8-u8s8 and ort-int8) gets that diagnosis instead
    of a second identical one."""
    from ptqflow.common.files import file_sha256
    from ptqflow.common.files import array_sha256
    from ptqflow.models.backends.ort import quantize

    reference = reference.ready_for(config)
    twin = config.quant_format != "QDQ"
    if twin or qdq_path is None:
        qdq_config = replace(config, quant_format="QDQ") if twin else config
        qdq_path = quantize(source, qdq_config, calibration, Path(work_dir) / ("qdq-twin" if twin else "qdq")).path
    method = _ORT_TWIN_METHOD.format(format=config.quant_format) if twin else _ORT_METHOD
    key = None
    if memo is not None:
        key = (file_sha256(qdq_path), reference.onnx.sha256, array_sha256(images), batch_size)
        if key in memo:
            return replace(memo[key], method=method)
    diagnosis = diagnose_ort(reference.ort_ready_path, qdq_path, images, layers_model=reference.onnx.proto,
                             method=method, batch_size=batch_size,
                             node_reasons=recipe_float_nodes(reference.onnx.proto, config))
    if key is not None:
        memo[key] = diagnosis
    return diagnosis
