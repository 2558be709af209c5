"""Function-preserving ONNX graph rewrites applied before quantization.

Every function takes an `onnx.ModelProto` and returns a new one; the input is never modified.

- :func:`fold_batch_norms`: inference-mode BatchNormalization folded into the Conv before it. Quantization must
  start from the folded weights: onnxruntime's pre-processing (and FX's conv-bn fusion) fold BatchNorm themselves,
  which would move weights that AdaRound already put on the int8 grid off it again.
- :func:`channel_constants_as_batch_norms`: a Conv's output multiplied, divided, shifted by a per-channel or single
  constant, written as the BatchNormalization it equals, for :func:`fold_batch_norms` to fold.
- :func:`name_unnamed_nodes`: a unique name for every node, since onnxruntime's `nodes_to_exclude` and other
  node-level options select nodes by name.
- :func:`materialize_constants`: weights fed by `Constant` nodes or by an `Identity` of a shared initializer become
  initializers of their own (onnx2torch reads weights from initializers only).
- :func:`upgrade_opset`: a model below opset 13 brought up to it, where per-channel quantization is defined.
- :func:`explicit_pads`: `auto_pad` SAME_UPPER, SAME_LOWER or VALID of Conv and pooling nodes written as the pads
  they mean (onnx2torch implements none of them; Keras and older TF converters write them).
- :func:`reshapes_without_allowzero`: Reshape's allowzero=1 dropped where no 0 in its shape can reach it.
- :func:`symmetric_average_pools`: an AveragePool padded more at one end than the other written as Pad, an
  unpadded AveragePool and a constant Mul (onnx2torch implements no asymmetric average pooling).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptqflow.models.graph.layer_map import readers_of

__all__ = ["fold_batch_norms", "channel_constants_as_batch_norms", "name_unnamed_nodes", "has_unnamed_nodes", "materialize_constants", "upgrade_opset",
           "model_opset", "clip_bounds", "explicit_pads", "symmetric_average_pools",
           "reshapes_without_allowzero"]

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)


# --------------------------------------------------------------------------- graph walking
def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, recursively, every subgraph of its nodes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for subgraph in _subgraphs(node):
            yield from _all_graphs(subgraph)


def _use_counts(graph: onnx.GraphProto) -> Counter:
    """How often each tensor name is read: node inputs anywhere (subgraphs may read outer-scope names) and graph
    outputs."""
    uses: Counter = Counter()
    for g in _all_graphs(graph):
        for node in g.node:
            uses.update(name for name in node.input if name)
        uses.update(output.name for output in g.output)
    return uses


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


# --------------------------------------------------------------------------- BatchNormalization folding
def _float_initializer(initializers: dict, name: str) -> np.ndarray | None:
    tensor = initializers.get(name)
    if tensor is None or tensor.data_type not in _FLOAT_TYPES:
        return None
    return numpy_helper.to_array(tensor)


def _inference_batch_norm(node: onnx.NodeProto) -> bool:
    """A BatchNormalization that normalizes with its stored statistics: no training mode, no extra outputs, the
    per-channel ("spatial") form."""
    return (node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and len(node.input) == 5
            and not any(node.output[1:]) and not _attribute(node, "training_mode", 0)
            and _attribute(node, "spatial", 1) == 1 and _attribute(node, "is_test", 1) == 1)


def _unique_name(base: str, taken: set[str]) -> str:
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def _rewritable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict, dict, set[str]]:
    """A copy of `model` to rewrite, with its main graph's initializers by name, the node that produces each tensor,
    and every name in use anywhere (so new initializers get unique ones)."""
    result = _copy(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output if output}
    taken = set(initializers) | {name for g in _all_graphs(graph) for node in g.node
                                 for name in (*node.input, *node.output)} | {value.name for value in graph.input}
    return result, initializers, producer, taken


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every inference-mode BatchNormalization of the main graph into the Conv before it; return the new
    model and the number folded.

    y = scale * (conv(x, W) + b - mean) / sqrt(var + epsilon) + B becomes conv(x, W') + b' with
    W' = W * s (per output channel), b' = (b - mean) * s + B, s = scale / sqrt(var + epsilon), computed in float64.
    A BatchNormalization is folded only when it reads the output of a Conv that nothing else reads (and that is not
    a graph output), and the Conv weight, its bias (if any) and all four statistics are float initializers with one
    value per output channel. Grouped and depthwise convolutions fold the same way (their weight's first axis is
    still the output channel). Weights shared with other nodes are copied, never changed under the other reader.
    """
    result, initializers, producer, taken = _rewritable(model)
    graph = result.graph
    graph_inputs = {value.name for value in graph.input}
    folded_bn: list[onnx.NodeProto] = []
    orphan_candidates: set[str] = set()
    for bn in list(graph.node):
        if not _inference_batch_norm(bn):
            continue
        conv = producer.get(bn.input[0])
        uses = _use_counts(graph)
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") \
                or uses[bn.input[0]] != 1 or len(conv.input) < 2:
            continue
        weight = _float_initializer(initializers, conv.input[1])
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        bias = _float_initializer(initializers, conv.input[2]) if has_bias else None
        stats = [_float_initializer(initializers, name) for name in bn.input[1:5]]
        if weight is None or weight.ndim < 3 or (has_bias and bias is None) or any(s is None for s in stats):
            continue
        channels = weight.shape[0]
        if any(s.shape != (channels,) for s in stats) or (bias is not None and bias.shape != (channels,)):
            continue
        gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
        epsilon = float(_attribute(bn, "epsilon", 1e-5))
        factor = gamma / np.sqrt(var + epsilon)
        new_weight = (weight.astype(np.float64) * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        old_bias = bias.astype(np.float64) if bias is not None else np.zeros(channels)
        new_bias = ((old_bias - mean) * factor + beta).astype(bias.dtype if bias is not None else weight.dtype)

        def store(position: int, array: np.ndarray, base: str) -> None:
            old = conv.input[position] if position < len(conv.input) else ""
            if old and uses[old] == 1 and old not in graph_inputs:  # this conv alone reads it: replace in place
                initializers[old].CopyFrom(numpy_helper.from_array(array, old))
                return
            name = _unique_name(base, taken)
            tensor = numpy_helper.from_array(array, name)
            graph.initializer.append(tensor)
            initializers[name] = graph.initializer[-1]
            if result.ir_version and result.ir_version < 4:  # before IR 4 every initializer is a graph input
                graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, array.shape))
            if old:
                orphan_candidates.add(old)
                conv.input[position] = name
            else:
                while len(conv.input) < position:
                    conv.input.append("")
                conv.input.append(name)

        stem = conv.name or bn.name or conv.output[0]
        store(1, new_weight, f"{stem}_bn_folded_weight")
        store(2, new_bias, f"{stem}_bn_folded_bias")
        orphan_candidates.update(bn.input[1:5])
        stale = conv.output[0]
        conv.output[0] = bn.output[0]
        producer[bn.output[0]] = conv
        producer.pop(stale, None)
        folded_bn.append(bn)
        graph.node.remove(bn)
        kept = [value for value in graph.value_info if value.name != stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    if not folded_bn:
        return result, 0
    uses = _use_counts(graph)
    orphans = {name for name in orphan_candidates if uses[name] == 0 and name in initializers}
    if orphans:
        kept_inits = [init for init in graph.initializer if init.name not in orphans]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        kept_inputs = [value for value in graph.input if value.name not in orphans]
        del graph.input[:]
        graph.input.extend(kept_inputs)
    return result, len(folded_bn)


# --------------------------------------------------------------------------- constants after a Conv
def clip_bounds(node: onnx.NodeProto, initializers: dict) -> tuple[float | None, float | None] | None:
    """(lower, upper) of a Clip (None where absent), or None when a bound is computed rather than a constant."""
    if _attribute(node, "min") is not None or _attribute(node, "max") is not None:  # opset 6-10
        return _attribute(node, "min"), _attribute(node, "max")
    bounds = []
    for position in (1, 2):
        name = node.input[position] if len(node.input) > position else ""
        if not name:
            bounds.append(None)
        elif name in initializers:
            bounds.append(float(numpy_helper.to_array(initializers[name]).reshape(-1)[0]))
        else:
            return None
    return bounds[0], bounds[1]


def _starts_hard_sigmoid(node: onnx.NodeProto, readers: dict, initializers: dict) -> bool:
    """`node` is the `x + 3` of relu6(x + 3) * (1/6) (or / 6), how Keras writes hard_sigmoid: graph preparation
    makes that one Hardsigmoid for FX, which it could no longer see with the 3 folded into x's Conv."""
    def only_reader(tensor: str, op_type: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    clip = only_reader(node.output[0], "Clip")
    if node.op_type != "Add" or clip is None or clip_bounds(clip, initializers) != (0.0, 6.0):
        return False
    scale = next(iter(readers.get(clip.output[0], [])), None)
    if scale is None or scale.op_type not in ("Mul", "Div"):
        return False
    expected = 1 / 6 if scale.op_type == "Mul" else 6.0
    return any(np.isclose(value, expected, rtol=1e-6) for value in
               (_float_initializer(initializers, name) for name in scale.input[1 if scale.op_type == "Div" else 0:])
               if value is not None and value.size == 1)


_CHANNEL_OPS = ("Mul", "Add", "Sub", "Div")


def channel_constants_as_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each Mul, Add, Sub or Div of a Conv's output by a float constant with one value per output channel (or one
    for all) written as the BatchNormalization it equals (epsilon 0, mean 0, variance 1), for fold_batch_norms to
    fold into the Conv; return the new model and the number rewritten.

    Exporters write a BatchNorm they could not fuse, a scaled branch or a bias as such ops. Left in the graph, each
    is quantized as an op of its own, with a scale of its own, and oneDNN's convolution-add fusion takes an added
    constant for a residual tensor and fails. Only what fold_batch_norms can fold is rewritten: a Conv that nothing
    else reads, with float initializer weights (and bias); `c - conv` and `conv / c` too, not `c / conv`; and not the
    `+ 3` of a written-out hard sigmoid (_starts_hard_sigmoid)."""
    result, initializers, producer, taken = _rewritable(model)
    graph = result.graph
    uses, readers = _use_counts(graph), readers_of(graph)
    rewritten = 0
    for index, node in enumerate(list(graph.node)):
        if node.op_type not in _CHANNEL_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2 \
                or _starts_hard_sigmoid(node, readers, initializers):
            continue
        for position in (0, 1):
            weight = _foldable_conv_weight(producer.get(node.input[position]), initializers, uses)
            constant = _float_initializer(initializers, node.input[1 - position])
            values = _per_channel(constant, weight.shape[0], weight.ndim) if weight is not None else None
            affine = _affine(node.op_type, position, values) if values is not None else None
            if affine is None:
                continue
            stem = node.name or node.output[0]
            names = []
            for suffix, array in zip(("scale", "shift", "mean", "variance"),
                                     (*affine, np.zeros(len(values)), np.ones(len(values)))):
                names.append(_unique_name(f"{stem}_as_bn_{suffix}", taken))
                graph.initializer.append(numpy_helper.from_array(array.astype(weight.dtype), names[-1]))
            norm = helper.make_node("BatchNormalization", [node.input[position], *names], [node.output[0]],
                                    name=node.name, epsilon=0.0)
            graph.node.remove(node)
            graph.node.insert(index, norm)
            rewritten += 1
            break
    return result, rewritten


def _foldable_conv_weight(conv: onnx.NodeProto | None, initializers: dict, uses: Counter) -> np.ndarray | None:
    """The weight of a Conv fold_batch_norms can fold a BatchNormalization into, else None."""
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2 \
            or uses[conv.output[0]] != 1:
        return None
    weight = _float_initializer(initializers, conv.input[1])
    bias = _float_initializer(initializers, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if weight is None or weight.ndim < 3 or (len(conv.input) > 2 and conv.input[2] and
                                             (bias is None or bias.shape != (weight.shape[0],))):
        return None
    return weight


def _per_channel(constant: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """`constant` as one float64 value per output channel when it broadcasts against the Conv's output (of `rank`
    axes) without changing its shape: one value, or (C, 1, ..) / (1, C, 1, ..) with at most `rank` axes."""
    if constant is None or constant.ndim > rank:
        return None
    if constant.size == 1:
        return np.full(channels, float(constant.reshape(())), dtype=np.float64)
    shape = (1,) * (rank - constant.ndim) + tuple(constant.shape)
    if shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
        return None
    return constant.reshape(channels).astype(np.float64)


def _affine(op: str, conv_position: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) with op(conv, c) == conv * scale + shift (op(c, conv) when conv_position is 1)."""
    if op == "Mul":
        return c, np.zeros_like(c)
    if op == "Add":
        return np.ones_like(c), c
    if op == "Sub":
        return (np.ones_like(c), -c) if conv_position == 0 else (-np.ones_like(c), c)
    if op == "Div" and conv_position == 0 and np.all(c != 0):
        return 1.0 / c, np.zeros_like(c)
    return None


# --------------------------------------------------------------------------- node names
def has_unnamed_nodes(model: onnx.ModelProto) -> bool:
    return any(not node.name for g in _all_graphs(model.graph) for node in g.node)


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node without a name is called f"{op_type}_{i}" (i: the node's position in a walk over
    the graph and then its subgraphs), with a numeric suffix where that name is already taken. Named nodes keep
    their names; the same model always gets the same names."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graphs = list(_all_graphs(result.graph))
    taken = {node.name for g in graphs for node in g.node if node.name}
    index = 0
    for g in graphs:
        for node in g.node:
            if not node.name:
                node.name = _unique_name(f"{node.op_type}_{index}", taken)
            index += 1
    return result


# --------------------------------------------------------------------------- constants and opsets
def materialize_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Weights that reach a node through a `Constant` node or an `Identity` of an initializer (exporters share
    equal tensors this way, e.g. the zero biases of folded convolutions) become initializers of their own, so
    converters that read weights from initializers (onnx2torch) accept the model and AdaRound can round each
    layer's weight without touching another's. Returns (model, number of tensors materialized)."""
    model = _copy(model)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    outputs = {output.name for output in graph.output}
    kept, count = [], 0
    for node in graph.node:
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _attribute(node, "value")
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in initializers \
                and node.output[0] not in outputs:
            value = initializers[node.input[0]]
        if value is None:
            kept.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(value)
        copy.name = node.output[0]
        graph.initializer.append(copy)
        initializers[copy.name] = copy
        count += 1
    del graph.node[:]
    graph.node.extend(kept)
    return model, count


MIN_QUANTIZATION_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (their `axis`) need opset 13


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model is written for."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_QUANTIZATION_OPSET) -> onnx.ModelProto:
    """The model at opset `target` when it is below it (onnx.version_converter), else unchanged. Raises the
    converter's error when an op has no adapter."""
    if model_opset(model) >= target:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, target)


# ops whose auto_pad pads the input alone (ConvTranspose's pads the output: left as written)
_AUTO_PAD_OPS = ("Conv", "AveragePool", "MaxPool", "LpPool")


def explicit_pads(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each Conv/AveragePool/MaxPool/LpPool with `auto_pad` SAME_UPPER, SAME_LOWER or VALID gets the `pads` that
    auto_pad means for its input's spatial size (ONNX's formula: the output is ceil(input / stride), the odd pixel
    at the end for SAME_UPPER, at the beginning for SAME_LOWER), and `auto_pad` NOTSET. A node whose input size is
    unknown keeps its auto_pad. Returns (model, number of nodes rewritten)."""
    from ptqflow.models.graph.layer_map import tensor_shapes

    if not any(_auto_pad(node) for node in model.graph.node):
        return model, 0
    model = _copy(model)
    shapes = tensor_shapes(model)
    count = 0
    for node in model.graph.node:
        mode = _auto_pad(node)
        pads = _pads_for(node, mode, shapes) if mode else None
        if pads is None:
            continue
        _replace_attributes(node, ("auto_pad", "pads"), pads=pads)
        count += 1
    return model, count


def _auto_pad(node: onnx.NodeProto) -> str | None:
    """The auto_pad mode of a node explicit_pads rewrites (SAME_UPPER, SAME_LOWER or VALID), else None."""
    if node.op_type not in _AUTO_PAD_OPS or node.domain not in ("", "ai.onnx"):
        return None
    mode = _attribute(node, "auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return None if mode == "NOTSET" else mode


def _pads_for(node: onnx.NodeProto, mode: str, shapes: dict) -> list[int] | None:
    """The explicit pads auto_pad `mode` means for `node`, or None when its input's spatial size or kernel is
    unknown."""
    size = (shapes.get(node.input[0]) or [None, None])[2:]
    kernel = _attribute(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv":
        kernel = (shapes.get(node.input[1]) or [])[2:]
    if not size or any(d is None for d in size) or not kernel or len(kernel) != len(size):
        return None
    if mode == "VALID":
        return [0] * (2 * len(size))
    strides = _attribute(node, "strides") or [1] * len(size)
    dilations = _attribute(node, "dilations") or [1] * len(size)
    begins, ends = [], []
    for length, k, stride, dilation in zip(size, kernel, strides, dilations):
        total = max((-(-length // stride) - 1) * stride + (k - 1) * dilation + 1 - length, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def reshapes_without_allowzero(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Reshape's `allowzero=1` (the dynamo `torch.onnx.export` writes it on every Reshape; onnx2torch refuses it)
    dropped where it changes nothing: it only decides what a 0 in the target shape means (a dimension of size 0
    rather than the input's own), so it goes where the shape is a constant without a 0, or computed while the model
    runs (from the input's sizes, where a 0 means an empty input). Returns (model, number of nodes changed)."""
    if not any(_allowzero_reshape(node) for node in model.graph.node):
        return model, 0
    model = _copy(model)
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: _attribute(n, "value") for n in model.graph.node if n.op_type == "Constant"})
    count = 0
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if len(node.input) > 1 else None
        if _allowzero_reshape(node) and (shape is None or 0 not in numpy_helper.to_array(shape)):
            _replace_attributes(node, ("allowzero",))
            count += 1
    return model, count


def _allowzero_reshape(node: onnx.NodeProto) -> bool:
    return node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and bool(_attribute(node, "allowzero", 0))


def symmetric_average_pools(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each 2-D AveragePool whose pads differ at the two ends of an axis (Keras "same" pooling of an odd size, once
    explicit_pads has written it) becomes a zero Pad, the same pool unpadded, and a Mul by a constant that gives each
    output the mean over the input pixels its window covers (count_include_pad 0, the default; with 1 the Pad alone
    is exact). onnx2torch refuses such a pool ("AvgPool with non symmetrical padding is not implemented"), which
    stopped the whole sweep at its FP32 conversion. A pool with ceil_mode, dilations or an input of unknown size
    stays as it is. Returns (model, number of pools rewritten)."""
    from ptqflow.models.graph.layer_map import tensor_shapes

    if not any(_asymmetric_pool(node) for node in model.graph.node):
        return model, 0
    model = _copy(model)
    shapes = tensor_shapes(model)
    taken = {n.name for n in model.graph.node} | {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    opset = model_opset(model)
    nodes, count = [], 0
    for node in model.graph.node:
        size = (shapes.get(node.input[0]) or [None])[2:] if _asymmetric_pool(node) else []
        if len(size) != 2 or any(not isinstance(d, int) for d in size):
            nodes.append(node)
            continue
        nodes.extend(_padded_pool(model, node, size, opset, taken))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, count


def _asymmetric_pool(node: onnx.NodeProto) -> bool:
    pads = _attribute(node, "pads") or []
    return (node.op_type == "AveragePool" and node.domain in ("", "ai.onnx") and len(pads) == 4
            and list(pads[:2]) != list(pads[2:]) and not _attribute(node, "ceil_mode", 0)
            and all(d == 1 for d in (_attribute(node, "dilations") or [1, 1])))


def _padded_pool(model: onnx.ModelProto, node: onnx.NodeProto, size: list[int], opset: int,
                 taken: set[str]) -> list[onnx.NodeProto]:
    """Pad -> unpadded `node` -> (Mul by the window-coverage correction, when count_include_pad is 0)."""
    pads, kernel = list(_attribute(node, "pads")), list(_attribute(node, "kernel_shape"))
    strides = list(_attribute(node, "strides") or [1, 1])
    include_pad = _attribute(node, "count_include_pad", 0)
    padded = _unique_name(f"{node.output[0]}_padded", taken)
    pad_name = _unique_name(f"{node.name or node.output[0]}_pad", taken)
    all_pads = [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]
    if opset >= 11:
        amounts = _unique_name(f"{pad_name}_amounts", taken)
        model.graph.initializer.append(numpy_helper.from_array(np.array(all_pads, np.int64), amounts))
        pad = helper.make_node("Pad", [node.input[0], amounts], [padded], name=pad_name, mode="constant")
    else:
        pad = helper.make_node("Pad", [node.input[0]], [padded], name=pad_name, mode="constant", pads=all_pads)
    _replace_attributes(node, ("pads", "count_include_pad"))
    node.input[0] = padded
    coverage = _coverage(size, kernel, strides, pads)
    if include_pad or coverage.min() == 1.0:
        return [pad, node]
    output = node.output[0]
    node.output[0] = _unique_name(f"{output}_unscaled", taken)
    scale = _unique_name(f"{pad_name}_coverage", taken)
    model.graph.initializer.append(numpy_helper.from_array((1.0 / coverage).astype(np.float32)[None, None], scale))
    mul = helper.make_node("Mul", [node.output[0], scale], [output], name=_unique_name(f"{node.name}_coverage", taken))
    return [pad, node, mul]


def _coverage(size: list[int], kernel: list[int], strides: list[int], pads: list[int]) -> np.ndarray:
    """[out_h, out_w]: the share of each output window that falls on the input rather than on padding."""
    axes = []
    for axis, (length, k, stride) in enumerate(zip(size, kernel, strides)):
        begin, end = pads[axis], pads[axis + 2]
        starts = np.arange((length + begin + end - k) // stride + 1) * stride - begin
        axes.append((np.minimum(starts + k, length) - np.maximum(starts, 0)) / k)
    return np.multiply.outer(*axes)


def _replace_attributes(node: onnx.NodeProto, dropped: tuple[str, ...], **added) -> None:
    """`node` without its attributes named in `dropped`, and with `added` (name=value) set."""
    kept = [a for a in node.attribute if a.name not in dropped]
    del node.attribute[:]
    node.attribute.extend([*kept, *(helper.make_attribute(name, value) for name, value in added.items())])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
