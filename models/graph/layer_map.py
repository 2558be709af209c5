"""The layers of an FP32 ONNX classifier as quantization sees them, named by their ONNX nodes, and the names each
backend gives them.

A *layer* is a Conv, ConvTranspose, Gemm or MatMul node (or an Add of two activations, a residual connection),
together with the nodes both backends fuse into it: a bias Add after a MatMul, then a Relu or Clip. Its output
tensor is the last fused node's output, the tensor both backends quantize. onnx2torch names each torch module after
its ONNX node ('.' becomes '/'), ptqflow.models.graph.fx_prep derives new names from those ('/' and '.' become '_', plus a
suffix such as `_padfold` or `_linear`), and onnxruntime's pre-processing names fused nodes after the first one
(`<MatMul>/MatMulAddFusion`), so `node_for_name` maps any of them back by the longest matching node name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["Layer", "layer_table", "node_for_name", "layer_nodes", "input_layers", "activation_inputs", "tensor_shapes",
           "LAYER_OPS"]

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ACTIVATIONS = ("Relu", "Clip")
# Ops that hand a quantized tensor on with the same quantization (both backends): what input_layers looks through.
_SAME_QUANTIZATION = ("Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "MaxPool", "Relu", "Clip",
                      "Pad")


@dataclass(frozen=True)
class Layer:
    name: str  # the ONNX node name
    op_type: str
    nodes: tuple[str, ...]  # this node and the nodes fused into it (bias Add, Relu/Clip)
    input: str  # the activation input tensor
    output: str  # the tensor after the fused nodes
    weight: str | None  # the weight initializer, if any
    macs: int  # multiply-accumulates per image (0 for Add)
    channel_axis: int  # the input's channel (feature) axis


def _sanitized(name: str) -> str:
    # torch's exporter starts node names with '/' ("/stem/stem.0/Conv"); onnx2torch drops it from module names
    return re.sub(r"[./]", "_", name).lstrip("_")


def node_for_name(name: str, node_names) -> str | None:
    """The ONNX node a torch module or onnxruntime node called `name` comes from: the node whose name, with '.' and
    '/' as '_', is `name` so written or its longest prefix followed by '_'. None when no node matches."""
    key = _sanitized(name)
    best = None
    for node_name in node_names:
        candidate = _sanitized(node_name)
        if candidate and (key == candidate or key.startswith(candidate + "_")):
            if best is None or len(candidate) > len(_sanitized(best)):
                best = node_name
    return best


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's shape (None for unknown or symbolic dimensions), initializers' included: from ONNX shape
    inference, and where that leaves a node's output unknown, from onnxruntime's symbolic shape inference, which
    also evaluates the shape arithmetic exporters write (a plain torch.onnx export at opset 11 computes each Pad's
    amounts with ConstantOfShape/Concat/Slice/Cast nodes, and ONNX inference then knows no shape after the first)."""
    shapes = _shapes_of(_inferred(onnx.shape_inference.infer_shapes, model))
    outputs = [name for node in model.graph.node for name in node.output if name]
    if any(not shapes.get(name) or None in shapes[name][1:] for name in outputs):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = _shapes_of(_inferred(lambda m: SymbolicShapeInference.infer_shapes(m, auto_merge=True), model))
        shapes.update({name: dims for name, dims in symbolic.items()
                       if dims and sum(d is not None for d in dims) > sum(d is not None for d in shapes.get(name) or [])})
    return shapes


def _inferred(infer, model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return infer(model)
    except Exception:  # noqa: BLE001 - shapes only size the MAC column and choose which layers to time
        return model


def _shapes_of(inferred: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _per_image(shape: list[int | None] | None) -> int | None:
    """Elements per image of a batch-first tensor shape; None when unknown."""
    if not shape or any(d is None for d in shape[1:]):
        return None
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def _macs(node: onnx.NodeProto, shapes: dict) -> int:
    weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "Conv" and weight:
        out = _per_image(shapes.get(node.output[0]))
        return out * int(np.prod(weight[1:])) if out else 0
    if node.op_type == "ConvTranspose" and weight:
        inp = _per_image(shapes.get(node.input[0]))
        return inp * int(np.prod(weight[1:])) if inp else 0
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0])
        out = _per_image(shapes.get(node.output[0]))
        if not a or not out or a[-1] is None:
            return 0
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if node.op_type == "Gemm" and trans_a else a[-1]
        return out * int(k) if k else 0
    return 0


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of `graph` that read it, in node order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    return readers


def layer_table(model: onnx.ModelProto) -> list[Layer]:
    """The layers of the main graph in node order, with their fused followers and MACs per image (from ONNX shape
    inference; 0 where shapes are unknown)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    consumers = readers_of(graph)
    outputs = {value.name for value in graph.output}
    shapes = tensor_shapes(model)

    def single_reader(tensor: str) -> onnx.NodeProto | None:
        readers = consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in outputs else None

    layers = []
    for node in graph.node:
        activations = [name for name in node.input if name and name not in initializers]
        if node.op_type in LAYER_OPS:
            weight = node.input[1] if len(node.input) > 1 and node.input[1] in initializers else None
        elif node.op_type == "Add" and len(activations) == 2:
            weight = None
        else:
            continue
        if not activations:
            continue
        fused, output = [node.name], node.output[0]
        follower = single_reader(output)
        if node.op_type == "MatMul" and follower is not None and follower.op_type == "Add" \
                and any(name in initializers for name in follower.input):
            fused.append(follower.name)
            output = follower.output[0]
            follower = single_reader(output)
        if follower is not None and follower.op_type in _ACTIVATIONS:
            fused.append(follower.name)
            output = follower.output[0]
        input_rank = len(shapes.get(activations[0]) or [])
        axis = input_rank - 1 if node.op_type == "MatMul" and input_rank else 1
        layers.append(Layer(name=node.name, op_type=node.op_type, nodes=tuple(fused), input=activations[0],
                            output=output, weight=weight, macs=_macs(node, shapes), channel_axis=axis))
    return layers


def layer_nodes(model: onnx.ModelProto, names, option: str = "fp32 layers") -> set[str]:
    """The ONNX node names that keeping the layers or nodes `names` in FP32 means: each named layer with its fused
    followers (a Conv's Relu too), each other named node alone. Raises ValueError for a name that is no node."""
    node_names = {node.name for node in model.graph.node}
    by_name = {layer.name: layer for layer in layer_table(model)}
    chosen: set[str] = set()
    for name in names:
        if name not in node_names:
            shown = ", ".join(sorted(by_name)[:8])
            raise ValueError(f"{option}: the model has no node named {name!r} (its layers: {shown}"
                             f"{', ...' if len(by_name) > 8 else ''})")
        chosen.update(by_name[name].nodes if name in by_name else (name,))
    return chosen


def input_layers(model: onnx.ModelProto, layers: list[Layer] | None = None) -> dict[str, tuple[str, ...]]:
    """For each layer, the layers whose output it reads (through ops that keep a tensor's quantization: transposes,
    reshapes, max pooling, a Relu of its own), in input order; empty for a layer fed by the model input or by other
    ops (pooling that requantizes, Concat, ...)."""
    graph = model.graph
    layers = layers if layers is not None else layer_table(model)
    initializers = {init.name for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output if name}
    nodes = {node.name: node for node in graph.node}
    by_output = {layer.output: layer.name for layer in layers}
    found = {}
    for layer in layers:
        names, todo, seen = [], [n for n in nodes[layer.name].input if n and n not in initializers], set()
        while todo:
            tensor = todo.pop(0)
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor in by_output:
                names.append(by_output[tensor])
                continue
            node = producer.get(tensor)
            if node is not None and node.op_type in _SAME_QUANTIZATION and node.input:
                todo.append(node.input[0])
        found[layer.name] = tuple(dict.fromkeys(names))
    return found


def activation_inputs(model: onnx.ModelProto, layers: list[Layer] | None = None) -> dict[str, tuple[str, ...]]:
    """For each layer, every activation tensor it reads (Layer.input is the first; a residual Add reads two)."""
    layers = layers if layers is not None else layer_table(model)
    initializers = {init.name for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    return {layer.name: tuple(dict.fromkeys(n for n in nodes[layer.name].input if n and n not in initializers))
            for layer in layers}
