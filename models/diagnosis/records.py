"""The diagnosis' records: one row per layer (`LayerDiagnosis`), the whole table (`Diagnosis`: worst first, JSON and
CSV), the thresholds that make a layer bad and the hint each bad layer gets (`hint_for`)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Callable

from ptqflow.models.graph.layer_map import Layer

DEBUG_IMAGES = 256  # a few seconds on a small CNN; enough images for stable per-layer SQNR
# 8-bit per-channel weights reach 40+ dB; per-tensor weights of a layer with one wide channel fall below 30
BAD_WEIGHT_DB = 30.0
BAD_LOCAL_DB = 25.0  # one 8-bit layer alone normally loses less than this
BAD_ACCUMULATED_DB = 15.0  # below this the layer's output has lost most of its precision, wherever it was lost
OUTLIER_RATIO = 8.0  # a channel 8x the median channel's range costs the others 3 of their 8 bits
BATCH_SIZE = 64  # images per run of a model: memory stays bounded
MAX_SHORT_NAME = 40  # characters of a layer or tensor name in tables and hints (the CSV and JSON keep full names)


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
    float_reason: str = ""  # a layer the backend left in FP32: why (the recipe, the tracer, the backend)
    # share of its outputs the int8 engine computed more than a step away from its quantization (engine_check)
    engine_departure: float | None = None

    @property
    def bad(self) -> bool:
        return bool(self.hint)


COLUMNS = ("layer", "op_type", "mac_share", "weight_sqnr_db", "local_sqnr_db", "accumulated_sqnr_db", "quantized",
           "input_tensor", "output_tensor", "input_range_ratio", "outlier_channel", "hint", "float_reason",
           "engine_departure")


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


def short_names(names) -> dict[str, str]:
    """Each name as people read it in a table: the shortest run of its last path components ('/' or ';'
    separated, as exporters nest scopes) that no other name ends with, its end kept when still longer than
    MAX_SHORT_NAME. Exporters' names run to 200 characters of scope for a 10-character layer."""
    names = list(dict.fromkeys(names))
    parts = {name: [p for p in re.split(r"[/;]", name) if p] or [name] for name in names}
    short = {}
    for name in names:
        for count in range(1, len(parts[name]) + 1):
            suffix = parts[name][-count:]
            if not any(other != name and parts[other][-count:] == suffix for other in names):
                break
        text = "/".join(suffix) if count < len(parts[name]) else name
        short[name] = text if len(text) <= MAX_SHORT_NAME else "…" + text[-(MAX_SHORT_NAME - 1):]
    clashes = {text for text in short.values() if list(short.values()).count(text) > 1}  # cut to the same end
    return {name: name if text in clashes else text for name, text in short.items()}


def hint_for(row: LayerDiagnosis, shown: Callable[[str], str] = str) -> str:
    """One line on what to try for a bad layer; empty for a layer that is fine or runs in FP32. `shown` gives a
    tensor's name as the hint prints it (short_names)."""
    if not row.quantized:
        return ""
    if row.engine_departure:
        return (f"the int8 engine computes this layer away from its quantization ({100 * row.engine_departure:.2f}% "
                "of outputs off by more than a step): try the x86 engine (onednn) or keep the layer in FP32")
    local, weight, accumulated = row.local_sqnr_db, row.weight_sqnr_db, row.accumulated_sqnr_db
    local_bad = local is not None and local < BAD_LOCAL_DB
    if local_bad and row.input_range_ratio is not None and row.input_range_ratio >= OUTLIER_RATIO:
        return (f"activation range set by one channel ({shown(row.input_tensor)} channel {row.outlier_channel} "
                f"spans {row.input_range_ratio:.0f}x the median live channel): try equalization or 16-bit "
                f"activations on {shown(row.input_tensor)}")
    if weight is not None and weight < BAD_WEIGHT_DB:
        return f"weights lose precision ({weight:.1f} dB): try per-channel weights or FP32 fallback of this layer"
    if local_bad:
        return (f"activation quantization noise ({local:.1f} dB on its own): try 16-bit activations on "
                f"{shown(row.input_tensor)} or {shown(row.output_tensor)}, or another calibration method")
    if accumulated is not None and accumulated < BAD_ACCUMULATED_DB:
        return (f"error accumulated upstream ({accumulated:.1f} dB here, {local:.1f} dB on its own): fix the worst "
                "layers before it" if local is not None else
                f"error accumulated upstream ({accumulated:.1f} dB here): fix the worst layers before it")
    return ""


def float_reasons(layers: list[Layer], quantized: dict, node_reasons: dict[str, str], unmapped: str,
                  otherwise: str) -> dict[str, str]:
    """Why each layer the backend did not quantize is in FP32, by layer name: the reason given for one of its nodes
    (`node_reasons`, by ONNX node name), `unmapped` for a layer nothing of the quantized model was mapped to, else
    `otherwise`."""
    reasons = {}
    for layer in layers:
        if quantized.get(layer.name):
            continue
        given = next((node_reasons[node] for node in layer.nodes if node in node_reasons), None)
        reasons[layer.name] = given or (unmapped if layer.name not in quantized else otherwise)
    return reasons


def layer_rows(layers: list[Layer], weight: dict, local: dict, accumulated: dict, ranges: dict,
               quantized: dict, reasons: dict[str, str] | None = None,
               departures: dict[str, float] | None = None) -> tuple[LayerDiagnosis, ...]:
    """One row per layer, in `layers`' order, from the measurements by layer name, each with its hint and, for a
    layer left in FP32, the reason from `reasons` (float_reasons), and the engine's departures by layer name."""
    total = sum(layer.macs for layer in layers) or 1
    tensors = short_names([name for layer in layers for name in (layer.input, layer.output) if name])
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
            input_range_ratio=ratio, outlier_channel=channel,
            float_reason="" if is_quantized else (reasons or {}).get(layer.name, ""),
            engine_departure=(departures or {}).get(layer.name))
        rows.append(replace(row, hint=hint_for(row, lambda name: tensors.get(name, name))))
    return tuple(rows)
