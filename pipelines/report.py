"""The comparison table of a sweep: one row per variant, rendered as Markdown, CSV and HTML."""

from __future__ import annotations

import csv
import html
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
    latency_ms_b1: float | None = None
    speedup_vs_fp32: float | None = None


COLUMNS = (
    ("variant", "variant"), ("framework", "framework"), ("backend", "backend"), ("weights", "weight_dtype"),
    ("activations", "activation_dtype"), ("format", "quant_format"), ("per-channel", "per_channel"),
    ("calibration", "calibration_method"), ("accuracy %", "accuracy"), ("Δ pp", "accuracy_delta_pp"),
    ("agreement %", "top1_agreement"), ("size KiB", "model_size_bytes"), ("compression", "compression_ratio"),
    ("latency ms", "latency_ms_b1"), ("speedup", "speedup_vs_fp32"), ("status", "status"),
)


_CELL_FORMATS = {
    "accuracy": lambda v: f"{100 * v:.2f}",
    "top1_agreement": lambda v: f"{100 * v:.2f}",
    "accuracy_delta_pp": lambda v: f"{v:+.2f}",
    "model_size_bytes": lambda v: f"{v / 1024:.1f}",
    "compression_ratio": lambda v: f"{v:.2f}x",
    "latency_ms_b1": lambda v: f"{v:.3f}",
    "speedup_vs_fp32": lambda v: f"{v:.2f}x",
    "per_channel": lambda v: "yes" if v else "no",
}


def cell(row: VariantRow, field: str) -> str:
    value = getattr(row, field)
    if value is None:
        return "—"
    return _CELL_FORMATS.get(field, str)(value)


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


NUMERIC_FIELDS = frozenset({"accuracy", "accuracy_delta_pp", "top1_agreement", "model_size_bytes",
                            "compression_ratio", "latency_ms_b1", "speedup_vs_fp32"})

# Inline so the page renders on its own wherever it is opened: the MLflow artifact preview or a downloaded file.
_HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 16px; color: #222; }
h1 { font-size: 18px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; white-space: nowrap; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.ok td.status { background: #e3f4e3; color: #1b5e20; }
tr.unsupported { color: #6d5a00; }
tr.unsupported td.status { background: #fff4cc; }
tr.failed { color: #8b1a1a; }
tr.failed td.status { background: #fbdada; }
ul.reasons { margin-top: 12px; padding-left: 20px; }
code { background: #f2f2f2; padding: 0 3px; }
"""


def to_html(rows: list[VariantRow], title: str = "") -> str:
    """A self-contained page (inline CSS, no scripts or external resources) with the comparison table."""
    esc = html.escape
    header = "".join(f"<th>{esc(h)}</th>" for h, _ in COLUMNS)
    body = []
    for row in rows:
        cells = []
        for _, field in COLUMNS:
            css_class = "num" if field in NUMERIC_FIELDS else "status" if field == "status" else ""
            attr = f' class="{css_class}"' if css_class else ""
            cells.append(f"<td{attr}>{esc(cell(row, field))}</td>")
        body.append(f'<tr class="{esc(row.status)}">{"".join(cells)}</tr>')
    reasons = [f"<li><code>{esc(r.variant)}</code> {esc(r.status)}: {esc(r.reason)}</li>" for r in rows if r.reason]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title or 'comparison')}</title>", f"<style>{_HTML_STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>" if title else "",
        "<table>", f"<thead><tr>{header}</tr></thead>", "<tbody>", *body, "</tbody>", "</table>",
        f'<ul class="reasons">{"".join(reasons)}</ul>' if reasons else "",
        "</body>", "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
