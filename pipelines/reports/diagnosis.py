"""A diagnosis as people read it: the rich table in the terminal, the per-variant SQNR plot and the plot comparing
variants (backends) layer by layer. Figures follow ptqflow.pipelines.reports.plots: a `*_figure` function returning a matplotlib
Figure whose artists that matter carry a gid, and a function without the suffix returning its PNG."""

from __future__ import annotations

import math

import numpy as np

from ptqflow.models.diagnosis.records import BAD_LOCAL_DB, Diagnosis, LayerDiagnosis, short_names
from ptqflow.pipelines.reports.plots import FONT_SIZE, _figure, _note, _png

LOCAL_COLOR = "#c0540c"
ACCUMULATED_COLOR = "tab:blue"
MAX_LABEL = 34  # characters of a layer name on a plot's axis; longer ones keep their end


def _short(name: str, limit: int = MAX_LABEL) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _db(value: float | None) -> str:
    if value is None:
        return "—"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def print_diagnosis(diagnosis: Diagnosis, title: str, console=None) -> None:
    """The table worst first, then one line per bad layer with its hint, then the method and notes."""
    from rich.table import Table

    from ptqflow.pipelines.reports.tables import _console

    console = console or _console()
    table = Table(title=title, show_lines=False)
    for header, justify in (("#", "right"), ("layer", "left"), ("op", "left"), ("MACs %", "right"),
                            ("weight dB", "right"), ("local dB", "right"), ("accum. dB", "right"),
                            ("input range ×", "right")):
        table.add_column(header, justify=justify, no_wrap=header != "layer")
    rows = diagnosis.worst_first()
    shown = short_names(row.layer for row in rows)  # the CSV and JSON artifacts keep the full names
    for rank, row in enumerate(rows, 1):
        ratio = "—" if row.input_range_ratio is None else f"{row.input_range_ratio:.1f}"
        style = "red" if row.bad else ("dim" if not row.quantized else None)
        table.add_row(str(rank), shown[row.layer] + ("" if row.quantized else " (FP32)"), row.op_type,
                      _macs(row.mac_share, table=True), _db(row.weight_sqnr_db), _db(row.local_sqnr_db),
                      _db(row.accumulated_sqnr_db), ratio, style=style)
    console.print(table)
    bad = [row for row in rows if row.bad]
    for row in bad:
        console.print(f"[red]![/] {shown[row.layer]}: {row.hint}", highlight=False)
    for row in rows:
        if not row.quantized and row.float_reason:
            console.print(f"[dim]FP32 {shown[row.layer]}: {row.float_reason}[/]", highlight=False)
    if not bad:
        console.print("no layer below the limits (local SQNR ≥ "
                      f"{BAD_LOCAL_DB:g} dB, weights and accumulated fine)", highlight=False)
    console.print(f"[dim]{diagnosis.images} images; {diagnosis.method}[/]", highlight=False)
    for note in diagnosis.notes:
        console.print(f"[dim]{note}[/]", highlight=False)


def _limits(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=40.0)
    return 0.0, max(BAD_LOCAL_DB + 5, 5 * math.ceil((top + 3) / 5))


def layer_sqnr(diagnosis: Diagnosis, title: str) -> bytes:
    return _png(layer_sqnr_figure(diagnosis, title))


def layer_sqnr_figure(diagnosis: Diagnosis, title: str):
    """Per layer, worst first from the top: local SQNR (this layer's quantization alone) and accumulated SQNR
    (everything up to its output) as paired horizontal bars, with the bad-layer limit. An infinite SQNR (no error)
    is drawn to the axis end; FP32 layers show their accumulated SQNR only."""
    rows = diagnosis.worst_first()
    fig, ax = _figure(max(3.0, 1.8 + 0.42 * len(rows)), title, "SQNR vs FP32 (dB, higher is better)")
    if not rows:
        _note(ax, "no layer to diagnose")
        return fig
    low, high = _limits([v for r in rows for v in (r.local_sqnr_db, r.accumulated_sqnr_db)])
    positions = np.arange(len(rows))
    height = 0.38

    def shown(value):
        return np.nan if value is None else min(value, high) if math.isfinite(value) else high

    local = [shown(r.local_sqnr_db) for r in rows]
    accumulated = [shown(r.accumulated_sqnr_db) for r in rows]
    ax.barh(positions - height / 2, local, height, color=LOCAL_COLOR, label="local (this layer alone, FP32 input)",
            gid="local")
    ax.barh(positions + height / 2, accumulated, height, color=ACCUMULATED_COLOR, alpha=0.75,
            label="accumulated (FP32 model vs quantized model)", gid="accumulated")
    for y, row in zip(positions, rows):
        if row.local_sqnr_db is not None:
            ax.text(shown(row.local_sqnr_db) + 0.3, y - height / 2, _db(row.local_sqnr_db), va="center",
                    fontsize=FONT_SIZE - 2, color=LOCAL_COLOR, fontweight="bold" if row.bad else "normal")
        elif row.quantized:
            ax.text(0.3, y - height / 2, "local not measured", va="center", fontsize=FONT_SIZE - 2, color="dimgray")
    labels = [f"{_short(r.layer)}{'' if r.quantized else ' (FP32)'}\n{r.op_type}{_macs(r.mac_share)}" for r in rows]
    ax.set_yticks(positions, labels, fontsize=FONT_SIZE - 1)
    for tick, row in zip(ax.get_yticklabels(), rows):
        if row.bad:
            tick.set_color(LOCAL_COLOR)
            tick.set_fontweight("bold")
    ax.invert_yaxis()  # worst on top
    ax.axvline(BAD_LOCAL_DB, color="black", linestyle="--", linewidth=1.1, gid="bad-limit",
               label=f"bad below {BAD_LOCAL_DB:g} dB (local)")
    ax.set_xlim(low, high + 3)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(fontsize=FONT_SIZE - 1, loc="outside lower center", ncol=2)
    return fig


def backend_comparison(diagnoses: dict[str, Diagnosis], title: str) -> bytes:
    return _png(backend_comparison_figure(diagnoses, title))


def backend_comparison_figure(diagnoses: dict[str, Diagnosis], title: str):
    """Variants (backends) side by side, layer by layer in graph order: local SQNR (top) and accumulated SQNR
    (bottom), one colour and marker per variant, on axes zoomed to the values and the bad-layer limit so a dB or two
    between backends shows. `diagnoses` maps variant name -> Diagnosis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ptqflow.pipelines.reports.plots import DPI, STEM_MARKERS, TITLE_SIZE, WIDTH_IN

    order: list[str] = []
    for diagnosis in diagnoses.values():
        order += [row.layer for row in diagnosis.layers if row.layer not in order]
    fig = Figure(figsize=(WIDTH_IN, 7.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title, fontsize=TITLE_SIZE)
    if not order:
        _note(top, "no layer to compare")
        return fig
    positions = np.arange(len(order))
    spread = 0.5 / max(1, len(diagnoses))
    values = []
    for k, (variant, diagnosis) in enumerate(diagnoses.items()):
        by_layer: dict[str, LayerDiagnosis] = {row.layer: row for row in diagnosis.layers}
        local = [_finite(by_layer[name].local_sqnr_db) if name in by_layer else np.nan for name in order]
        accumulated = [_finite(by_layer[name].accumulated_sqnr_db) if name in by_layer else np.nan for name in order]
        values += local + accumulated
        style = {"color": f"C{k % 10}", "marker": STEM_MARKERS[k % len(STEM_MARKERS)], "markersize": 7}
        offset = (k - (len(diagnoses) - 1) / 2) * spread
        top.plot(positions + offset, local, linestyle="none", label=variant, gid=f"local:{variant}", **style)
        bottom.plot(positions, accumulated, label=variant, gid=f"accumulated:{variant}", **style)
    finite = [v for v in values if not np.isnan(v)] + [BAD_LOCAL_DB]
    low, high = 5 * math.floor((min(finite) - 2) / 5), 5 * math.ceil((max(finite) + 2) / 5)
    for ax, label in ((top, "local SQNR (dB)\nthis layer alone"), (bottom, "accumulated SQNR (dB)\nFP32 vs quantized")):
        ax.set_ylabel(label, fontsize=FONT_SIZE)
        ax.set_ylim(low, high)
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
    top.axhline(BAD_LOCAL_DB, color="black", linestyle="--", linewidth=1.0, gid="bad-limit",
                label=f"bad below {BAD_LOCAL_DB:g} dB")
    bottom.set_xticks(positions, [_short(name, 24) for name in order], rotation=40, ha="right",
                      fontsize=FONT_SIZE - 1)
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=FONT_SIZE - 1, loc="outside lower center", ncol=min(4, len(labels)))
    return fig


def _macs(share: float, table: bool = False) -> str:
    """A MAC share as a table cell (percent) or a plot label's suffix; nothing for a layer without MACs (Add)."""
    if share <= 0:
        return "—" if table else ""
    text = "<0.1" if share < 0.001 else f"{100 * share:.1f}"
    return text if table else f", {text}% MACs"


def _finite(value: float | None) -> float:
    if value is None:
        return np.nan
    return value if math.isfinite(value) else np.nan
