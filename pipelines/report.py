"""The comparison table of a sweep: one row per variant, rendered as Markdown and CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass


@dataclass(frozen=True)
class VariantRow:
    variant: str
    framework: str
    backend: str
    weight_dtype: str
    activation_dtype: str
    quant_format: str
    per_channel: bool | None
    calibration_method: str
    status: str
    accuracy: float | None = None
    accuracy_delta_pp: float | None = None
    top1_agreement: float | None = None
    model_size_bytes: int | None = None
    compression_ratio: float | None = None
    reason: str = ""
    run_id: str = ""


COLUMNS = (
    ("variant", "variant"), ("framework", "framework"), ("backend", "backend"), ("weights", "weight_dtype"),
    ("activations", "activation_dtype"), ("format", "quant_format"), ("per-channel", "per_channel"),
    ("calibration", "calibration_method"), ("accuracy %", "accuracy"), ("Δ pp", "accuracy_delta_pp"),
    ("agreement %", "top1_agreement"), ("size KiB", "model_size_bytes"), ("compression", "compression_ratio"),
    ("status", "status"),
)


def cell(row: VariantRow, field: str) -> str:
    value = getattr(row, field)
    if value is None:
        return "—"
    if field in ("accuracy", "top1_agreement"):
        return f"{100 * value:.2f}"
    if field == "accuracy_delta_pp":
        return f"{value:+.2f}"
    if field == "model_size_bytes":
        return f"{value / 1024:.1f}"
    if field == "compression_ratio":
        return f"{value:.2f}x"
    if field == "per_channel":
        return "yes" if value else "no"
    return str(value)


def to_markdown(rows: list[VariantRow], title: str = "") -> str:
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(h for h, _ in COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, f) for _, f in COLUMNS) + " |")
    notes = [f"- `{r.variant}` {r.status}: {r.reason}" for r in rows if r.reason]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[VariantRow]) -> str:
    out = io.StringIO()
    fields = [f for _, f in COLUMNS] + ["reason", "run_id"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: getattr(row, f) for f in fields})
    return out.getvalue()
