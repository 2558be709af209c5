"""Per-layer diagnosis of a quantized model: where does quantization lose the signal, and what would help.

Each row is one layer of the FP32 ONNX model (ptqflow.models.graph.layer_map: a Conv/Gemm/MatMul or residual Add with the Relu
fused into it), named by its ONNX node, with

- `mac_share`: the layer's share of the model's multiply-accumulates (ONNX shape inference);
- `weight_sqnr_db`: FP32 weights vs the quantized model's (dequantized) weights;
- `local_sqnr_db`: this layer's quantization alone: the quantized layer fed the FP32 model's own input to it,
  against the FP32 layer's output;
- `accumulated_sqnr_db`: the FP32 model vs the quantized model at the layer's output tensor, every error upstream
  included;
- `input_range_ratio` / `outlier_channel`: how far the largest channel of the layer's input (max |x| per channel
  over the images) is above the median channel, the sign that one channel sets a per-tensor activation scale;
- `hint`: one line on what to try when the layer is bad (see `hint_for`).

SQNR is 20 log10(||x|| / ||x - y||) over all images (the definition of torch.ao.ns.fx.utils.compute_sqnr and of
onnxruntime's compute_signal_to_quantization_noice_ratio), accumulated batch by batch so memory stays bounded.

The libraries' own tools do the matching and logging:

- PyTorch FX (`diagnose_fx`): `torch.ao.ns._numeric_suite_fx` `extract_weights` (weights), `add_loggers`
  (accumulated) and `add_shadow_loggers` (local: each quantized layer shadows the FP32 one on its input);
- onnxruntime QDQ (`diagnose_ort`): `onnxruntime.quantization.qdq_loss_debug`
  `modify_model_output_intermediate_tensors` on both models, their intermediate tensors collected as
  `collect_activations` collects them (one session per model, run batch by batch), `create_activation_matching`
  (accumulated), `create_weight_matching` (weights); local: each layer's Q/DQ subgraph of the QDQ model, run on the
  FP32 model's activations. QOperator models have no Q/DQ pairs to match, so `diagnose_ort_config` diagnoses their
  QDQ twin (the same config with quant_format QDQ) and says so in `Diagnosis.method`.

The reference is the FP32 model the quantizer started from before AdaRound (equalized when the config equalizes:
equalization keeps the model's function but rescales its channels, so tensors compare only against the equalized
model). Nothing here logs anywhere; ptqflow.pipelines.repair.diagnose does.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import io
import json
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ptqflow.models.graph.layer_map import Layer, layer_table, node_for_name, tensor_shapes

__all__ = [
    "LayerDiagnosis", "Diagnosis", "diagnose_fx", "diagnose_fx_graphs", "diagnose_ort", "diagnose_ort_config",
    "hint_for", "DEBUG_IMAGES", "BAD_LOCAL_DB", "BAD_WEIGHT_DB", "BAD_ACCUMULATED_DB", "OUTLIER_RATIO",
]

DEBUG_IMAGES = 256  # a few seconds on a small CNN; enough images for stable per-layer SQNR
# 8-bit per-channel weights reach 40+ dB; per-tensor weights of a layer with one wide channel fall below 30
BAD_WEIGHT_DB = 30.0
BAD_LOCAL_DB = 25.0  # one 8-bit layer alone normally loses less than this
BAD_ACCUMULATED_DB = 15.0  # below this the layer's output has lost most of its precision, wherever it was lost
OUTLIER_RATIO = 8.0  # a channel 8x the median channel's range costs the others 3 of their 8 bits
_BATCH = 64


@dataclass(frozen=True)
class LayerDiagnosis:
    layer: str  # ONNX node name
    op_type: str
    mac_share: float
    weight_sqnr_db: float | None
    local_sqnr_db: float | None
    accumulated_sqnr_db: float | None
    quantized: bool = True  # False for layers the backend left in FP32 (float head, fp32 fallback)
    input_tensor: str = ""
    output_tensor: str = ""
    input_range_ratio: float | None = None  # largest channel's max |x| over the median channel's
    outlier_channel: int | None = None  # that largest channel
    hint: str = ""

    @property
    def bad(self) -> bool:
        return bool(self.hint)


COLUMNS = ("layer", "op_type", "mac_share", "weight_sqnr_db", "local_sqnr_db", "accumulated_sqnr_db", "quantized",
           "input_tensor", "output_tensor", "input_range_ratio", "outlier_channel", "hint")


def _rank_key(row: LayerDiagnosis):
    missing = math.inf
    return (row.local_sqnr_db if row.local_sqnr_db is not None else missing,
            row.accumulated_sqnr_db if row.accumulated_sqnr_db is not None else missing)


@dataclass(frozen=True)
class Diagnosis:
    backend: str  # "pytorch-fx" or "onnxruntime"
    method: str  # which tools compared what, e.g. that a QOperator model was diagnosed through its QDQ twin
    images: int
    layers: tuple[LayerDiagnosis, ...]  # in graph order
    notes: tuple[str, ...] = ()

    def worst_first(self) -> list[LayerDiagnosis]:
        """Rows by local SQNR, lowest first (a layer's own loss, not what it inherits), then accumulated; layers
        without a local SQNR (FP32 layers) last."""
        return sorted(self.layers, key=_rank_key)

    def row(self, layer: str) -> LayerDiagnosis:
        return next(r for r in self.layers if r.layer == layer)

    def with_notes(self, *notes: str) -> "Diagnosis":
        return replace(self, notes=self.notes + tuple(n for n in notes if n))

    def to_dict(self) -> dict:
        def clean(value):
            return "inf" if isinstance(value, float) and math.isinf(value) else value

        return {"backend": self.backend, "method": self.method, "images": self.images, "notes": list(self.notes),
                "graph_order": [row.layer for row in self.layers],
                "layers": [{k: clean(v) for k, v in asdict(row).items()} for row in self.worst_first()]}

    @classmethod
    def from_dict(cls, payload: dict) -> "Diagnosis":
        """The Diagnosis a `to_dict` (layers.json) was made from."""
        def number(value):
            return math.inf if value == "inf" else value

        keys = set(LayerDiagnosis.__dataclass_fields__)
        rows = [LayerDiagnosis(**{k: number(v) for k, v in row.items() if k in keys})
                for row in payload.get("layers", [])]
        order = {name: i for i, name in enumerate(payload.get("graph_order", ()))}
        rows = tuple(sorted(rows, key=lambda row: order.get(row.layer, len(order))))
        return cls(payload["backend"], payload["method"], int(payload["images"]), rows,
                   tuple(payload.get("notes", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_csv(self) -> str:
        """One row per layer, worst first; SQNR in dB with 2 decimals, empty where not measured."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.worst_first():
            values = asdict(row)
            writer.writerow([_csv_cell(k, values[k]) for k in COLUMNS])
        return out.getvalue()


def _csv_cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4f}" if key == "mac_share" else f"{value:.2f}"
    return str(value)


def hint_for(row: LayerDiagnosis) -> str:
    """One line on what to try for a bad layer; empty for a layer that is fine or runs in FP32."""
    if not row.quantized:
        return ""
    local, weight, accumulated = row.local_sqnr_db, row.weight_sqnr_db, row.accumulated_sqnr_db
    local_bad = local is not None and local < BAD_LOCAL_DB
    if local_bad and row.input_range_ratio is not None and row.input_range_ratio >= OUTLIER_RATIO:
        return (f"activation range set by one channel ({row.input_tensor} channel {row.outlier_channel} spans "
                f"{row.input_range_ratio:.0f}x the median channel): try equalization or 16-bit activations on "
                f"{row.input_tensor}")
    if weight is not None and weight < BAD_WEIGHT_DB:
        return f"weights lose precision ({weight:.1f} dB): try per-channel weights or FP32 fallback of this layer"
    if local_bad:
        return (f"activation quantization noise ({local:.1f} dB on its own): try 16-bit activations on "
                f"{row.input_tensor} or {row.output_tensor}, or another calibration method")
    if accumulated is not None and accumulated < BAD_ACCUMULATED_DB:
        return (f"error accumulated upstream ({accumulated:.1f} dB here, {local:.1f} dB on its own): fix the worst "
                "layers before it" if local is not None else
                f"error accumulated upstream ({accumulated:.1f} dB here): fix the worst layers before it")
    return ""


def _flat64(x) -> np.ndarray:
    """`x` as a flat float64 array (no copy when it is one already)."""
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _energy(flat: np.ndarray) -> float:
    """Sum of squares of a flat float64 array, accumulated in float64, in one pass. (einsum, not np.dot: BLAS's
    threads would contend with onnxruntime's for the cores.)"""
    return float(np.einsum("i,i->", flat, flat))


class _Power:
    """Signal and noise energy of one comparison, summed over batches: SQNR over all images at the end."""

    __slots__ = ("signal", "noise", "seen")

    def __init__(self):
        self.signal = self.noise = 0.0
        self.seen = False

    def add(self, reference: np.ndarray, other: np.ndarray, signal: float | None = None) -> None:
        """Add one batch; `signal`: `_energy(_flat64(reference))` when the caller has it (a reference compared twice,
        passed as its `_flat64`, which is then not converted again)."""
        reference = _flat64(reference)
        # float64 difference of the float32 values (no float64 copy of `other`); its size must match
        difference = reference - np.asarray(other).reshape(reference.shape)
        self.signal += _energy(reference) if signal is None else signal
        self.noise += _energy(difference)
        self.seen = True

    def db(self) -> float | None:
        if not self.seen:
            return None
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


class _ChannelRange:
    """max |x| per channel over batches."""

    def __init__(self):
        self.values: np.ndarray | None = None

    def add(self, x: np.ndarray, axis: int) -> None:
        x = np.abs(np.moveaxis(np.asarray(x), axis, 0)).reshape(x.shape[axis], -1).max(axis=1)
        self.values = x if self.values is None else np.maximum(self.values, x)

    def outlier(self) -> tuple[float | None, int | None]:
        if self.values is None or self.values.size < 2:
            return None, None
        median = float(np.median(self.values))
        channel = int(np.argmax(self.values))
        if median <= 0.0:
            return (math.inf if self.values[channel] > 0 else None), channel
        return float(self.values[channel] / median), channel


def _rows(layers: list[Layer], weight: dict, local: dict, accumulated: dict, ranges: dict,
          quantized: dict) -> tuple[LayerDiagnosis, ...]:
    total = sum(layer.macs for layer in layers) or 1
    rows = []
    for layer in layers:
        ratio, channel = ranges[layer.name].outlier() if layer.name in ranges else (None, None)
        is_quantized = quantized.get(layer.name, False)
        row = LayerDiagnosis(
            layer=layer.name, op_type=layer.op_type, mac_share=layer.macs / total,
            weight_sqnr_db=weight.get(layer.name) if is_quantized else None,
            local_sqnr_db=local[layer.name].db() if is_quantized and layer.name in local else None,
            accumulated_sqnr_db=accumulated[layer.name].db() if layer.name in accumulated else None,
            quantized=is_quantized, input_tensor=layer.input, output_tensor=layer.output,
            input_range_ratio=ratio, outlier_channel=channel)
        rows.append(replace(row, hint=hint_for(row)))
    return tuple(rows)


# ---- float activations of an ONNX model, batch by batch ----------------------------------------------------------
def _session_options():
    """onnxruntime session options for the diagnosis' sessions: graph optimization off (collect_activations' own
    setting; the Q/DQ nodes run as written), warnings off, and worker threads that sleep rather than spin between
    runs: several sessions are alive at once and run in turn, each one's spinning threads would slow down the others
    and numpy (a session's results do not depend on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class _ActivationReader:
    """A model augmented by `modify_model_output_intermediate_tensors`, in one onnxruntime session run batch by batch:
    each batch's intermediate tensors (flattened by the augmented model's Reshape outputs), named as
    `collect_activations` names them. The session is made as collect_activations makes its own (graph optimization
    off, CPU provider; see `_session_options`), once instead of once per batch."""

    def __init__(self, augmented: Path, input_name: str):
        import onnxruntime as ort
        from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX  # what collect_activations strips

        self._session = ort.InferenceSession(str(augmented), sess_options=_session_options(),
                                             providers=["CPUExecutionProvider"])
        self._input_name = input_name
        # (position in the session's outputs, tensor name) of the saved tensors
        self._saved = [(i, output.name[:-len(_TENSOR_SAVE_POSTFIX)])
                       for i, output in enumerate(self._session.get_outputs())
                       if output.name.endswith(_TENSOR_SAVE_POSTFIX)]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._session.run(None, {self._input_name: batch})
        return {name: outputs[i] for i, name in self._saved}


def _augmented(model_path: Path, target: Path) -> Path:
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    with contextlib.redirect_stdout(io.StringIO()):
        modify_model_output_intermediate_tensors(str(model_path), str(target))
    return target


def _unflatten(flat: np.ndarray, shape: list | None, batch: int) -> np.ndarray | None:
    if not shape or any(d is None for d in shape[1:]):
        return None
    return flat.reshape(batch, *shape[1:])


def _input_name(model) -> str:
    initializers = {init.name for init in model.graph.initializer}
    return next(value.name for value in model.graph.input if value.name not in initializers)


def input_channel_ranges(float_onnx_path: Path, images: np.ndarray, layers: list[Layer],
                         batch_size: int = _BATCH) -> dict[str, _ChannelRange]:
    """Per layer, max |x| of each channel of its input over `images`, from the FP32 ONNX model."""
    import onnx

    model = onnx.load(str(float_onnx_path))
    shapes, input_name = tensor_shapes(model), _input_name(model)
    ranges = {layer.name: _ChannelRange() for layer in layers}
    with tempfile.TemporaryDirectory(prefix="ptqflow-diagnosis-") as scratch:
        collect = _ActivationReader(_augmented(Path(float_onnx_path), Path(scratch) / "float_augmented.onnx"),
                                    input_name)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            acts = collect(batch)
            for layer in layers:
                x = acts.get(layer.input)
                x = _unflatten(x, shapes.get(layer.input), len(batch)) if x is not None else None
                if x is not None:
                    ranges[layer.name].add(x, layer.channel_axis)
    return ranges


# ---- onnxruntime QDQ --------------------------------------------------------------------------------------------
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


def diagnose_ort(float_onnx_path: Path, qdq_onnx_path: Path, images: np.ndarray, *, layers_model=None,
                 batch_size: int = _BATCH, method: str | None = None) -> Diagnosis:
    """Diagnose a QDQ model against the FP32 model it was quantized from (`float_onnx_path`: the model quantize_static
    read, i.e. after onnxruntime's pre-processing, whose tensor and weight names the QDQ model keeps). Layers are
    named after `layers_model` (an onnx.ModelProto; default: the float model), e.g. the FP32 model before
    pre-processing, so FX and onnxruntime rows share names. `images` are model-ready inputs."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
    )

    float_onnx_path, qdq_onnx_path = Path(float_onnx_path), Path(qdq_onnx_path)
    reference = onnx.load(str(float_onnx_path))
    qdq = onnx.load(str(qdq_onnx_path))
    naming = layers_model if layers_model is not None else reference
    layers = layer_table(naming)
    names = [node.name for node in naming.graph.node]
    known = set(names)
    walk = _QdqGraph(qdq)
    by_node = {node: layer for layer in layers for node in layer.nodes}
    compute = {}  # layer name -> its compute node in the QDQ model
    for node in qdq.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        original = node.name if node.name in known else node_for_name(node.name, names)
        layer = by_node.get(original)
        if layer is not None and layer.name not in compute and layer.nodes[0] == original:
            compute[layer.name] = node
    float_tensors = {name for node in reference.graph.node for name in node.output} | {
        v.name for v in reference.graph.input}

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight_errors = compute_weight_error(_unsigned_weights_fixed(
            create_weight_matching(str(float_onnx_path), str(qdq_onnx_path)), qdq))
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

    shapes = tensor_shapes(reference)
    options = _session_options()  # graph optimization off: the Q/DQ run as written
    sessions = {}
    for name, (out, dequantized, inputs) in plans.items():
        if not all(i in float_tensors for i in inputs):
            continue
        sub = _subgraph(qdq, inputs, dequantized)
        if sub is not None:
            sessions[name] = ort.InferenceSession(sub.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"])
    local = {name: _Power() for name in sessions}
    accumulated = {name: _Power() for name in plans}
    ranges = {layer.name: _ChannelRange() for layer in layers}
    input_name = _input_name(reference)
    with tempfile.TemporaryDirectory(prefix="ptqflow-diagnosis-") as scratch:
        collect_float = _ActivationReader(_augmented(float_onnx_path, Path(scratch) / "float_augmented.onnx"),
                                          input_name)
        collect_qdq = _ActivationReader(_augmented(qdq_onnx_path, Path(scratch) / "qdq_augmented.onnx"), input_name)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            float_acts = collect_float(batch)
            qdq_acts = collect_qdq(batch)
            matching = create_activation_matching({k: [v] for k, v in qdq_acts.items()},
                                                  {k: [v] for k, v in float_acts.items()})
            for name, (out, dequantized, inputs) in plans.items():
                compared = []  # (power, the QDQ side) of the comparisons with float_acts[out]
                match = matching.get(out)
                if match is not None and "float" in match:  # its "float" side is float_acts[out], passed through
                    compared.append((accumulated[name], match["post_qdq"][0]))
                elif out in qdq_acts and out in float_acts:  # a layer left in FP32: its output is not QDQ-ed
                    compared.append((accumulated[name], qdq_acts[dequantized if dequantized in qdq_acts else out]))
                if name in sessions:
                    feeds = {i: _unflatten(float_acts[i], shapes.get(i), len(batch)) for i in inputs}
                    if all(v is not None for v in feeds.values()):
                        compared.append((local[name], sessions[name].run(None, feeds)[0]))
                if compared:  # the FP32 side converted and its energy summed once for both comparisons
                    flat = _flat64(float_acts[out])
                    signal = _energy(flat)
                    for power, other in compared:
                        power.add(flat, other, signal)
            for layer in layers:
                x = float_acts.get(layer.input)
                x = _unflatten(x, shapes.get(layer.input), len(batch)) if x is not None else None
                if x is not None:
                    ranges[layer.name].add(x, layer.channel_axis)
    return Diagnosis("onnxruntime", method or _ORT_METHOD, len(images),
                     _rows(layers, weight, local, accumulated, ranges, quantized))


_ORT_METHOD = ("onnxruntime.quantization.qdq_loss_debug (create_weight_matching; collect_activations + "
               "create_activation_matching for accumulated SQNR); local SQNR: each layer's Q/DQ subgraph of the QDQ "
               "model run on the FP32 model's activations")
_ORT_TWIN_METHOD = ("QDQ twin of this {format} model (the same config with quant_format=QDQ): "
                    "onnxruntime.quantization.qdq_loss_debug (create_weight_matching; collect_activations + "
                    "create_activation_matching); local SQNR: each layer's Q/DQ subgraph run on the FP32 model's "
                    "activations")


def diagnose_ort_config(reference, source, config, calibration: np.ndarray, images: np.ndarray, work_dir: Path,
                        qdq_path: Path | None = None, batch_size: int = _BATCH, memo: dict | None = None) -> Diagnosis:
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
                             method=method, batch_size=batch_size)
    if key is not None:
        memo[key] = diagnosis
    return diagnosis


def _as_float(value):
    return value.dequantize() if value.is_quantized else value


def _clear(*modules) -> None:
    import torch.ao.ns._numeric_suite_fx as ns

    for module in modules:
        for logger in module.modules():
            if isinstance(logger, ns.OutputLogger):
                logger.stats = []


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
    (it is the FP32 side of the comparisons), and observers such as graph_prep.PercentileObserver sort every
    activation they see."""
    from torch.ao.quantization import ObserverBase

    copied = copy.deepcopy(prepared)
    for module in copied.modules():
        if isinstance(module, ObserverBase):
            module.forward = _identity
    return copied


def _identity(x):
    return x


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


def diagnose_fx_graphs(reference_prepared, quantized, images: np.ndarray, onnx_model, backend: str,
                       float_onnx_path: Path | None = None, batch_size: int = _BATCH) -> Diagnosis:
    """Diagnose an FX-converted `quantized` GraphModule against `reference_prepared`, the FP32 model prepared the same
    way (quantize_pytorch.prepare_reference). Rows are the layers of `onnx_model` (the ONNX model both were converted
    from), FX modules mapped back to its nodes. `float_onnx_path` (that model's file) adds each layer's input channel
    ranges. Runs under torch's quantized engine `backend`."""
    import torch
    import torch.ao.ns._numeric_suite_fx as ns
    from torch.ao.ns.fx.utils import compute_sqnr

    layers = layer_table(onnx_model)
    names = [node.name for node in onnx_model.graph.node]
    by_node = {node: layer for layer in layers for node in layer.nodes}

    def layer_of(fqn: str | None) -> tuple[Layer | None, int]:
        if not fqn:
            return None, -1
        node = node_for_name(fqn, names)
        layer = by_node.get(node)
        return layer, (layer.nodes.index(node) if layer else -1)

    from ptqflow.models.backends.pytorch_fx import fx_quantization

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
                                                       copy.deepcopy(quantized), ns.OutputLogger)
            # int8 shadows fp32 (not the other way round): each quantized layer gets the FP32 model's input to it,
            # quantized with the layer's own input qparams, and is compared with the FP32 layer's output.
            shadowed = ns.add_shadow_loggers("int8", copy.deepcopy(quantized), "fp32",
                                             copy.deepcopy(reference_prepared), ns.OutputLogger)
            nodes = {node.name: node for node in shadowed.graph.nodes}

            def record(target: dict, layer: Layer, position: int, reference, value) -> None:
                key = (id(target), layer.name)
                if depth.get(key, -1) > position:
                    return  # an earlier node of the layer: the output of its fused Relu is what counts
                if depth.get(key, -1) < position:
                    target[layer.name] = _Power()
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
    rows = _rows(layers, weight, local, accumulated, ranges, is_quantized)
    notes = ()
    unshadowed = [r.layer for r in rows if r.quantized and r.local_sqnr_db is None]
    if unshadowed:
        notes = (f"no local SQNR for {', '.join(unshadowed)}: add_shadow_loggers cannot shadow that pattern "
                 "(e.g. quantized add_relu)",)
    return Diagnosis("pytorch-fx", method, len(images), rows, notes)


def diagnose_fx(reference, source, config, calibration: np.ndarray, images: np.ndarray, graphs=None,
                batch_size: int = _BATCH) -> Diagnosis:
    """Diagnose a PyTorch FX variant: `reference` is the FP32 FloatModel before AdaRound, `source` the one the
    quantizer reads (AdaRound-ed when the config asks for it; see FloatModel.for_config). Quantizes `source` with
    `config` and `calibration` the way quantize_pytorch.quantize does, unless `graphs` (its FxGraphs) are given."""
    from ptqflow.models.backends.pytorch_fx import prepare_reference, quantize_graphs

    graphs = graphs or quantize_graphs(source, config, calibration)
    reference = reference.ready_for(config)
    prepared = prepare_reference(reference, config, graphs.example)
    return diagnose_fx_graphs(prepared, graphs.converted, images, reference.onnx.proto, config.backend,
                              float_onnx_path=reference.onnx.path, batch_size=batch_size)
