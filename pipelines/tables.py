"""Terminal tables: the comparison of a sweep, as rich tables on stdout."""

from __future__ import annotations

import csv
import io
import sys

from rich.console import Console
from rich.table import Table

from pipelines import report



def _console() -> Console:
    # Piped or captured output has no width of its own; wide enough that no column is cut.
    return Console() if sys.stdout.isatty() else Console(width=200)


# The terminal shows the columns a person compares; comparison.md/.csv on the run hold all of them.
TERMINAL_COLUMNS = tuple((h, f) for h, f in report.COLUMNS
                         if f not in ("framework", "backend", "calibration_method", "compression_ratio"))


def _rich_table(rows: list[report.VariantRow], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for header, field in TERMINAL_COLUMNS:
        numeric = field in ("accuracy", "accuracy_delta_pp", "top1_agreement", "model_size_bytes", "compression_ratio")
        table.add_column(header, justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        style = {"ok": None, "unsupported": "yellow", "failed": "red"}.get(row.status)
        table.add_row(*(report.cell(row, f) for _, f in TERMINAL_COLUMNS), style=style)
    return table


def print_rows(rows: list[report.VariantRow], title: str | None = None) -> None:
    console = _console()
    console.print(_rich_table(rows, title))
    for row in rows:
        if row.reason:
            console.print(f"[dim]{row.variant}: {row.reason}[/]", highlight=False)


def rows_from_csv(text: str) -> list[report.VariantRow]:
    def num(value: str, kind=float):
        return kind(float(value)) if value not in ("", "None") else None

    def flag(value: str) -> bool | None:
        return None if value in ("", "None") else value == "True"

    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        rows.append(report.VariantRow(
            variant=rec["variant"], framework=rec["framework"], backend=rec["backend"],
            weight_dtype=rec["weight_dtype"], activation_dtype=rec["activation_dtype"],
            quant_format=rec["quant_format"], per_channel=flag(rec["per_channel"]),
            calibration_method=rec["calibration_method"], status=rec["status"], accuracy=num(rec["accuracy"]),
            accuracy_delta_pp=num(rec["accuracy_delta_pp"]), top1_agreement=num(rec["top1_agreement"]),
            model_size_bytes=num(rec["model_size_bytes"], int), compression_ratio=num(rec["compression_ratio"]),
            reason=rec["reason"], run_id=rec["run_id"],
            # Sweeps logged before latency was measured have no such columns.
            latency_ms_b1=num(rec.get("latency_ms_b1", "")), speedup_vs_fp32=num(rec.get("speedup_vs_fp32", ""))))
    return rows


def print_sweep_table(run_id: str | None, experiment: str) -> None:
    from tracking import runs
    from tracking.keys import Artifact

    run_id = run_id or runs.latest_sweep_run_id(experiment)
    rows = rows_from_csv(runs.download_text(run_id, Artifact.COMPARISON_CSV))
    print_rows(rows, title=f"sweep {run_id}")
