"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.1) of Conv -> Relu -> Conv pairs on the FP32 ONNX graph.

ReLU is positively homogeneous, relu(x / s) = relu(x) / s for s > 0, so dividing output channel i of the first
convolution (weights and bias) by s_i and multiplying input channel i of the second by s_i leaves the model's function
unchanged. With s_i = sqrt(r1_i / r2_i), where r1_i is the largest |weight| of the first convolution's output channel
i and r2_i that of the second convolution's input channel i, both ranges become sqrt(r1_i * r2_i): a channel whose
weights (and so whose activations) were far larger than the others' no longer sets the whole tensor's quantization
range. Convolutions in a chain (Conv -> Relu -> Conv -> Relu -> Conv) belong to two pairs, so the pairs are
equalized in turn, several times over, until the scales settle.

onnxruntime.quantization ships no equalization (its only pre-quantization transform of this kind is SmoothQuant,
which needs neural-compressor and targets MatMul activations, not Conv -> Relu -> Conv), so it is written here.

Every function takes an `onnx.ModelProto` and returns a new one; the input is never modified. Initializers keep
their names (they are rewritten in place when nothing else reads them), so weight-by-name tools such as
onnxruntime's `create_weight_matching` still pair them with the quantized model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ptqflow.models.graph.layer_map import readers_of

__all__ = ["EqualizationSummary", "equalize", "equalize_file", "equalizable_pairs", "DEFAULT_ITERATIONS"]

DEFAULT_ITERATIONS = 20  # passes over all pairs; chains of two or three pairs settle within a few
_SCALE_LIMITS = (1e-6, 1e6)  # a dead channel (all-zero weights on one side) keeps scale 1 instead of 0 or inf


@dataclass(frozen=True)
class EqualizationSummary:
    """What `equalize` did: the (first Conv, second Conv) node-name pairs it equalized, the candidates it left alone
    with the reason, and the largest and smallest per-channel scale it applied in total."""

    pairs: tuple[tuple[str, str], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (node name, reason)
    iterations: int = 0
    max_scale: float = 1.0
    min_scale: float = 1.0
    scales: dict = field(default_factory=dict, repr=False, compare=False)  # (conv1, conv2) -> per-channel scales

    def to_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "skipped": [list(s) for s in self.skipped],
                "iterations": self.iterations, "max_scale": self.max_scale, "min_scale": self.min_scale}


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_plain_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and _attribute(node, "group", 1) == 1


def equalizable_pairs(model: onnx.ModelProto) -> tuple[list[tuple[onnx.NodeProto, onnx.NodeProto]],
                                                        list[tuple[str, str]]]:
    """(pairs, skipped): the Conv -> Relu -> Conv pairs of the main graph that can be equalized, and why other Conv ->
    Relu -> Conv candidates cannot. A pair qualifies when both convolutions have group 1 and float initializer
    weights (and bias) of matching channel counts, the first Conv's output is read by the Relu alone and the Relu's
    output by the second Conv alone (as its data input), and neither is a graph output."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = readers_of(graph)
    outputs = {value.name for value in graph.output}
    pairs, skipped = [], []
    for conv1 in graph.node:
        if conv1.op_type != "Conv" or not conv1.output or conv1.output[0] in outputs:
            continue
        readers = consumers.get(conv1.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Relu":
            continue
        relu = readers[0]
        after = consumers.get(relu.output[0], [])
        if not after or not any(n.op_type == "Conv" for n in after):
            continue
        name = conv1.name or conv1.output[0]
        if len(after) != 1 or relu.output[0] in outputs:
            skipped.append((name, f"{relu.output[0]} is read by {len(after)} nodes"
                                  f"{' and is a graph output' if relu.output[0] in outputs else ''}; "
                                  "equalizing would change the others' inputs"))
            continue
        conv2 = after[0]
        if conv2.op_type != "Conv" or conv2.input[0] != relu.output[0]:
            continue
        if not (_is_plain_conv(conv1) and _is_plain_conv(conv2)):
            skipped.append((name, "grouped or depthwise convolution (only group=1 is equalized)"))
            continue
        w1, w2 = initializers.get(conv1.input[1]), initializers.get(conv2.input[1])
        has_bias = len(conv1.input) > 2 and bool(conv1.input[2])
        b1 = initializers.get(conv1.input[2]) if has_bias else None
        if w1 is None or w2 is None or (has_bias and b1 is None):
            skipped.append((name, "weights or bias are computed, not initializers"))
            continue
        if any(t.data_type != onnx.TensorProto.FLOAT for t in (w1, w2) + ((b1,) if b1 is not None else ())):
            skipped.append((name, "weights are not float32"))
            continue
        if w1.dims[0] != w2.dims[1]:
            skipped.append((name, "channel counts differ"))
            continue
        pairs.append((conv1, conv2))
    return pairs, skipped


def equalize(model: onnx.ModelProto, iterations: int = DEFAULT_ITERATIONS,
             tolerance: float = 1e-4) -> tuple[onnx.ModelProto, EqualizationSummary]:
    """A copy of `model` with every equalizable Conv -> Relu -> Conv pair (see `equalizable_pairs`) equalized, and a
    summary. Iterates over all pairs up to `iterations` times, stopping early once no scale moves by more than
    `tolerance` (relative). Computed in float64, stored as float32. Weights or biases that other nodes read too are
    copied under a new name rather than changed under the other reader."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    pairs, skipped = equalizable_pairs(result)
    if not pairs:
        return result, EqualizationSummary(skipped=tuple(skipped))
    graph = result.graph
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                uses[name] = uses.get(name, 0) + 1
    for value in graph.output:
        uses[value.name] = uses.get(value.name, 0) + 1
    taken = {init.name for init in graph.initializer} | {n for node in graph.node for n in (*node.input, *node.output)}
    arrays: dict[str, np.ndarray] = {}  # working float64 copies, by (possibly new) initializer name

    def private(node: onnx.NodeProto, position: int) -> str:
        """The initializer name this node may change: its own, or a fresh copy when others read it too."""
        name = node.input[position]
        if name in arrays:
            return name
        source = next(init for init in graph.initializer if init.name == name)
        array = numpy_helper.to_array(source).astype(np.float64)
        if uses.get(name, 0) > 1:
            base, index = f"{name}_equalized", 0
            new = base
            while new in taken:
                index += 1
                new = f"{base}_{index}"
            taken.add(new)
            graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), new))
            uses[name] -= 1
            uses[new] = 1
            node.input[position] = new
            name = new
        arrays[name] = array
        return name

    names = []
    for conv1, conv2 in pairs:
        w1 = private(conv1, 1)
        b1 = private(conv1, 2) if len(conv1.input) > 2 and conv1.input[2] else None
        w2 = private(conv2, 1)
        names.append((conv1, conv2, w1, b1, w2))
    def key(conv1, conv2) -> tuple[str, str]:
        return conv1.name or conv1.output[0], conv2.name or conv2.output[0]

    total = {key(c1, c2): np.ones(arrays[w1].shape[0]) for c1, c2, w1, _, _ in names}
    done = 0
    for done in range(1, iterations + 1):
        moved = 0.0
        for conv1, conv2, w1, b1, w2 in names:
            first, second = arrays[w1], arrays[w2]
            r1 = np.abs(first).reshape(first.shape[0], -1).max(axis=1)
            r2 = np.abs(second).swapaxes(0, 1).reshape(second.shape[1], -1).max(axis=1)
            scale = np.ones_like(r1)
            alive = (r1 > 0) & (r2 > 0)
            scale[alive] = np.sqrt(r1[alive] / r2[alive])
            scale = np.clip(scale, *_SCALE_LIMITS)
            arrays[w1] = first / scale.reshape(-1, *[1] * (first.ndim - 1))
            if b1 is not None:
                arrays[b1] = arrays[b1] / scale
            arrays[w2] = second * scale.reshape(1, -1, *[1] * (second.ndim - 2))
            total[key(conv1, conv2)] *= scale
            moved = max(moved, float(np.max(np.abs(scale - 1.0))))
        if moved <= tolerance:
            break
    by_name = {init.name: init for init in graph.initializer}
    for name, array in arrays.items():
        by_name[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    all_scales = np.concatenate(list(total.values()))
    return result, EqualizationSummary(
        pairs=tuple(total),
        skipped=tuple(skipped), iterations=done, max_scale=float(all_scales.max()),
        min_scale=float(all_scales.min()), scales={k: v.astype(np.float32) for k, v in total.items()})


def equalize_file(source, target, iterations: int = DEFAULT_ITERATIONS) -> tuple["Path", EqualizationSummary]:
    """`equalize` on an ONNX file (weights embedded), written to `target`; returns (target, summary)."""
    from pathlib import Path

    from ptqflow.common.files import write_atomic

    model, summary = equalize(onnx.load(str(source)), iterations)
    target = Path(target)
    write_atomic(target, model.SerializeToString())
    return target, summary
