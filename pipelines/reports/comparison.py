"""The comparison table of a sweep: one row per variant, rendered as Markdown, CSV and HTML.

Timings name their batch size everywhere: batch-1 p50 latency, and speedups over FP32 onnxruntime at batch 1 (from
p50 latency) and at batch 256 (from throughput), both > 1 when the variant is faster. Timings whose spread says the
machine was busy are marked with CONTENDED_MARK and explained under the table.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from typing import Callable

from ptqflow.models.runtime.latency import CONTENDED_SPREAD
from ptqflow.pipelines.variants.specs import FP32


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
    latency_ms_b1_p50: float | None = None
    speedup_b1_vs_fp32: float | None = None  # FP32 onnxruntime's batch-1 p50 latency / this one's: > 1 is faster
    speedup_b256_vs_fp32: float | None = None  # this batch-256 throughput / FP32 onnxruntime's: > 1 is faster
    contended: bool | None = None  # its timings' spread says the machine was busy (ptqflow.models.runtime.latency)
    int8_mac_share: float | None = None  # share of the MACs its recipe runs in 8-bit integers (0 for FP32)


@dataclass(frozen=True)
class Champion:
    """The version a registered model's @champion alias points to, and the run that made it."""

    model: str
    version: str
    run_id: str


COLUMNS = (
    ("variant", "variant"), ("framework", "framework"), ("backend", "backend"), ("weights", "weight_dtype"),
    ("activations", "activation_dtype"), ("int8 MACs %", "int8_mac_share"), ("format", "quant_format"),
    ("per-channel", "per_channel"),
    ("calibration", "calibration_method"), ("accuracy %", "accuracy"), ("Δ pp", "accuracy_delta_pp"),
    ("agreement %", "top1_agreement"), ("size KiB", "model_size_bytes"), ("compression", "compression_ratio"),
    ("b1 p50 latency ms", "latency_ms_b1_p50"), ("b1 speedup vs FP32", "speedup_b1_vs_fp32"),
    ("b256 speedup vs FP32", "speedup_b256_vs_fp32"), ("status", "status"),
)
# Cells computed from timings: marked when the timing (or, for a speedup, FP32's) was contended.
TIMING_FIELDS = ("latency_ms_b1_p50", "speedup_b1_vs_fp32", "speedup_b256_vs_fp32")
SPEEDUP_FIELDS = ("speedup_b1_vs_fp32", "speedup_b256_vs_fp32")
CONTENDED_MARK = "†"
# A row --resume reused: its run (an earlier sweep's, same inputs) is the record; outcome_of_run writes this reason.
REUSED_REASON = "reused run"
REUSED_MARK = "↺"
REUSED_NOTE = (f"{REUSED_MARK} reused by --resume: a finished run of an earlier sweep with the same inputs (code, CPU "
               "and threads included); its numbers, timings too, are that run's")
CONTENDED_NOTE = (f"{CONTENDED_MARK} timed while the machine was busy (p90/p50 of the timings above "
                  f"{CONTENDED_SPREAD:g}; for a speedup, its own or FP32's): not a measurement of the model")
SPEEDUP_NOTE = ("speedups are over FP32 onnxruntime in the same sweep, > 1 = faster: b1 from batch-1 p50 latency, "
                "b256 from batch-256 throughput")
MAC_SHARE_NOTE = ("int8 MACs %: the share of the model's multiply-accumulates the recipe runs in 8-bit integers "
                  "(weights and activations name the 8-bit layers' types; the float head and a -mixed variant's "
                  "upgraded layers run in FP32 or 16 bits)")


_CELL_FORMATS = {
    "accuracy": lambda v: f"{100 * v:.2f}",
    "top1_agreement": lambda v: f"{100 * v:.2f}",
    "int8_mac_share": lambda v: f"{100 * v:.2f}",
    "accuracy_delta_pp": lambda v: f"{v:+.2f}",
    "model_size_bytes": lambda v: f"{v / 1024:.1f}",
    "compression_ratio": lambda v: f"{v:.2f}x",
    "latency_ms_b1_p50": lambda v: f"{v:.3f}",
    "speedup_b1_vs_fp32": lambda v: _ratio(v),
    "speedup_b256_vs_fp32": lambda v: _ratio(v),
    "per_channel": lambda v: "yes" if v else "no",
}


def _ratio(value: float) -> str:
    """3 significant digits, as the metric is recorded (ptqflow.pipelines.shared.precision): 0.00300x, 0.760x, 2.31x, 12.0x."""
    return f"{value:.0f}x" if abs(value) >= 100 else f"{value:#.3g}x"


def cell(row: VariantRow, field: str, fp32_contended: bool = False) -> str:
    value = getattr(row, field)
    if value is None:
        return "—"
    text = _CELL_FORMATS.get(field, str)(value)
    if field == "variant" and is_reused(row):
        return f"{text} {REUSED_MARK}"
    return text + CONTENDED_MARK if is_contended(row, field, fp32_contended) else text


def is_reused(row: VariantRow) -> bool:
    """Whether the row is a run an earlier sweep made, reused by --resume."""
    return row.reason.startswith(REUSED_REASON)


def is_contended(row: VariantRow, field: str, fp32_contended: bool = False) -> bool:
    """Whether the cell's number comes from a contended timing: its own, or FP32's for a speedup."""
    if field not in TIMING_FIELDS or getattr(row, field) is None:
        return False
    return bool(row.contended) or (fp32_contended and field in SPEEDUP_FIELDS)


def fp32_contended(rows: list[VariantRow]) -> bool:
    return any(r.variant == FP32 and r.contended for r in rows)


def best_variant(rows: list[VariantRow]) -> VariantRow | None:
    """The best quantized variant by the registry's criterion (highest agreement with FP32, then accuracy), over
    all of them: registration further keeps int8 weights and picks one per framework."""
    candidates = [r for r in rows if r.status == "ok" and r.variant != FP32 and r.top1_agreement is not None]
    return max(candidates, key=lambda r: (r.top1_agreement, r.accuracy or 0.0), default=None)


def notes(rows: list[VariantRow]) -> list[str]:
    """What the table's marks and speedup columns mean, as plain sentences."""
    out = [SPEEDUP_NOTE] + ([MAC_SHARE_NOTE] if any(r.int8_mac_share is not None for r in rows) else [])
    fp32_busy = fp32_contended(rows)
    if any(is_contended(r, f, fp32_busy) for r in rows for f in TIMING_FIELDS):
        out.append(CONTENDED_NOTE)
    if any(is_reused(r) for r in rows):
        out.append(REUSED_NOTE)
    return out


def to_markdown(rows: list[VariantRow], title: str = "") -> str:
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(h for h, _ in COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    fp32_busy = fp32_contended(rows)
    for row in rows:
        lines.append("| " + " | ".join(cell(row, f, fp32_busy) for _, f in COLUMNS) + " |")
    best = best_variant(rows)
    lines += ["", *(f"- {note}" for note in notes(rows))]
    if best is not None:
        lines.append(f"- best variant: `{best.variant}` (highest agreement with FP32, then accuracy)")
    lines += [f"- `{r.variant}` {r.status}: {r.reason}" for r in rows if r.reason]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[VariantRow]) -> str:
    out = io.StringIO()
    fields = [f for _, f in COLUMNS] + ["contended", "reason", "run_id"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: getattr(row, f) for f in fields})
    return out.getvalue()


NUMERIC_FIELDS = frozenset({"accuracy", "accuracy_delta_pp", "top1_agreement", "model_size_bytes",
                            "compression_ratio", "int8_mac_share", *TIMING_FIELDS})

# The page fits a 1,400 px laptop window: related columns share a cell, headers and text cells wrap (numbers never
# do), and should a table ever be wider, it scrolls inside its own box instead of widening the page.
# (header, fields, how they share a cell)
HTML_COLUMNS = (
    ("variant", ("variant",), "{}"),
    # "onnxruntime (onnxruntime-cpu)" says it twice: a backend named after its framework stands alone
    ("framework (backend)", ("framework", "backend"), lambda f, b: b if b.startswith(f) else f"{f} ({b})"),
    ("weights / activations (int8 MACs %)", ("weight_dtype", "activation_dtype", "int8_mac_share"),
     lambda w, a, m: f"{w} / {a}" + ("" if m == "—" else f" ({m})")),
    ("format", ("quant_format",), "{}"), ("per-channel", ("per_channel",), "{}"),
    ("calibration", ("calibration_method",), "{}"), ("accuracy %", ("accuracy",), "{}"),
    ("Δ pp", ("accuracy_delta_pp",), "{}"), ("agreement %", ("top1_agreement",), "{}"),
    ("size KiB (compression)", ("model_size_bytes", "compression_ratio"), "{} ({})"),
    ("b1 p50 latency ms", ("latency_ms_b1_p50",), "{}"), ("b1 speedup vs FP32", ("speedup_b1_vs_fp32",), "{}"),
    ("b256 speedup vs FP32", ("speedup_b256_vs_fp32",), "{}"), ("status", ("status",), "{}"),
)

# Inline so the page renders on its own wherever it is opened: the MLflow artifact preview or a downloaded file.
_HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 16px; color: #222; }
h1 { font-size: 18px; }
div.table-box { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 6px; }
th { background: #f2f2f2; text-align: left; vertical-align: bottom; min-width: 3.5em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.variant { white-space: normal; min-width: 10em; }
td.variant a, td.variant span { white-space: nowrap; }
span.mark { display: inline-block; margin-left: 4px; padding: 0 5px; border-radius: 8px; font-size: 12px; }
span.mark.best { background: #dbe9fb; color: #0b3d91; }
span.mark.champion { background: #ffe08a; color: #5c3d00; font-weight: bold; }
span.mark.reused { background: #ececec; color: #444; }
tr.best td.variant, tr.champion td.variant { font-weight: bold; }
td.contended { background: #fff4cc; }
tr.ok td.status { background: #e3f4e3; color: #1b5e20; }
tr.unsupported { color: #6d5a00; }
tr.unsupported td.status { background: #fff4cc; }
tr.failed { color: #8b1a1a; }
tr.failed td.status { background: #fbdada; }
ul.notes { margin-top: 12px; padding-left: 20px; }
code { background: #f2f2f2; padding: 0 3px; }
"""


def to_html(rows: list[VariantRow], title: str = "", run_url: Callable[[str], str] | None = None,
            champions: list[tuple[Champion, str]] = ()) -> str:
    """A self-contained page (inline CSS, no scripts or external resources) with the comparison table.

    run_url(run_id) gives each variant's link to its run in the MLflow UI; champions are the registered models'
    @champion versions after this sweep with a link to the run that made each ("" for none). The best variant
    (`best_variant`) and the rows that made a champion are marked."""
    esc = html.escape
    header = "".join(f"<th>{esc(h)}</th>" for h, _, _ in HTML_COLUMNS)
    best = best_variant(rows)
    champion_of = {}
    for champion, _ in champions:
        champion_of.setdefault(champion.run_id, []).append(champion)
    fp32_busy = fp32_contended(rows)
    body = []
    for row in rows:
        cells = []
        for _, fields, layout in HTML_COLUMNS:
            if fields == ("variant",):
                cells.append(f'<td class="variant">{_variant_cell(row, run_url, row is best, champion_of)}</td>')
                continue
            css = ["num"] if fields[0] in NUMERIC_FIELDS else ["status"] if fields == ("status",) else []
            if any(is_contended(row, f, fp32_busy) for f in fields):
                css.append("contended")
            texts = [cell(row, f, fp32_busy) for f in fields]
            text = layout(*texts) if callable(layout) else layout.format(*texts)
            if all(getattr(row, f) is None for f in fields):
                text = "—"
            attr = f' class="{" ".join(css)}"' if css else ""
            cells.append(f"<td{attr}>{esc(text)}</td>")
        css = [row.status] + (["best"] if row is best else []) + (["champion"] if row.run_id in champion_of else [])
        body.append(f'<tr class="{esc(" ".join(css))}">{"".join(cells)}</tr>')
    notes_html = [f"<li>{esc(note)}</li>" for note in notes(rows)]
    if best is not None:
        notes_html.append(f'<li><span class="mark best">best</span> <code>{esc(best.variant)}</code>: the highest '
                          "agreement with FP32, then accuracy, among the quantized variants</li>")
    for champion, url in champions:
        version = f"{esc(champion.model)} v{esc(champion.version)}"
        made_by = (f'<a href="{esc(url)}">run {esc(champion.run_id[:8])}</a>' if url
                   else f"run {esc(champion.run_id[:8])}")
        here = " (a row of this sweep)" if any(r.run_id == champion.run_id for r in rows) else " (an earlier sweep)"
        notes_html.append(f'<li><span class="mark champion">@champion</span> of {version}: made by {made_by}'
                          f"{here}</li>")
    notes_html += [f"<li><code>{esc(r.variant)}</code> {esc(r.status)}: {esc(r.reason)}</li>" for r in rows if r.reason]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title or 'comparison')}</title>", f"<style>{_HTML_STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>" if title else "",
        '<div class="table-box">', "<table>", f"<thead><tr>{header}</tr></thead>", "<tbody>", *body, "</tbody>",
        "</table>", "</div>",
        f'<ul class="notes">{"".join(notes_html)}</ul>',
        "</body>", "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _variant_cell(row: VariantRow, run_url, is_best: bool, champion_of: dict[str, list[Champion]]) -> str:
    esc = html.escape
    name = esc(row.variant)
    url = run_url(row.run_id) if run_url and row.run_id else ""
    parts = [f'<a href="{esc(url)}" title="run {esc(row.run_id)} in the MLflow UI">{name}</a>' if url
             else f"<span>{name}</span>"]
    if is_best:
        parts.append('<span class="mark best">best</span>')
    if is_reused(row):
        parts.append(f'<span class="mark reused" title="{esc(row.reason)}">{REUSED_MARK} reused</span>')
    for champion in champion_of.get(row.run_id, []) if row.run_id else []:
        parts.append(f'<span class="mark champion" title="{esc(champion.model)} v{esc(champion.version)}">'
                     "@champion</span>")
    return " ".join(parts)
