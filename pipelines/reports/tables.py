"""Terminal tables: the comparison of a sweep, as rich tables on stdout."""

from __future__ import annotations

import csv
import io
import sys

from rich.console import Console
from rich.table import Table

from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.shared.names import names_a_version, parse_version_ref



def _console() -> Console:
    # Piped or captured output has no width of its own; wide enough that no column is cut.
    return Console() if sys.stdout.isatty() else Console(width=240)


# The terminal shows the columns a person compares; comparison.md/.csv on the run hold all of them.
TERMINAL_COLUMNS = tuple((h, f) for h, f in report.COLUMNS
                         if f not in ("framework", "backend", "calibration_method", "compression_ratio"))


def _rich_table(rows: list[report.VariantRow], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for header, field in TERMINAL_COLUMNS:
        numeric = field in report.NUMERIC_FIELDS
        table.add_column(header, justify="right" if numeric else "left", no_wrap=True)
    fp32_busy = report.fp32_contended(rows)
    for row in rows:
        style = {"ok": None, "unsupported": "yellow", "failed": "red"}.get(row.status)
        table.add_row(*(report.cell(row, f, fp32_busy) for _, f in TERMINAL_COLUMNS), style=style)
    return table


def print_rows(rows: list[report.VariantRow], title: str | None = None) -> None:
    console = _console()
    console.print(_rich_table(rows, title))
    for note in report.notes(rows):
        console.print(f"[dim]{note}[/]", highlight=False)
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
            # Sweeps logged before latency was measured have no such columns; older ones name them without the
            # batch size (latency_ms_b1, speedup_vs_fp32 = batch 256) and have no batch-1 speedup or contention.
            latency_ms_b1_p50=num(rec.get("latency_ms_b1_p50", rec.get("latency_ms_b1", ""))),
            speedup_b1_vs_fp32=num(rec.get("speedup_b1_vs_fp32", "")),
            speedup_b256_vs_fp32=num(rec.get("speedup_b256_vs_fp32", rec.get("speedup_vs_fp32", ""))),
            contended=flag(rec.get("contended", "")),
            int8_mac_share=num(rec.get("int8_mac_share", ""))))  # absent from sweeps before it was recorded
    return rows


def print_sweep_table(run_id: str | None, experiment: str | None = None) -> None:
    from ptqflow.tracking import records
    from ptqflow.tracking import runs
    from ptqflow.tracking.keys import Artifact

    run_id = run_id or runs.latest_sweep_run_id(experiment)
    rows = rows_from_csv(records.download_text(run_id, Artifact.COMPARISON_CSV))
    print_rows(rows, title=f"sweep {run_id}")


# ---- comparing runs, sweeps and registered versions ---------------------------------------------------------------
COMPARED_METRICS = (  # (metric key, header, scale, format, higher is better)
    ("accuracy", "accuracy %", 100, "{:.2f}", True),
    ("top1_agreement", "agreement %", 100, "{:.2f}", True),
    ("model_size_bytes", "size KiB", 1 / 1024, "{:.1f}", False),
    ("latency_ms_b1_p50", "b1 p50 latency ms", 1, "{:.3f}", False),
    ("throughput_ips_b256", "b256 img/s", 1, "{:.0f}", True),
)


def _fmt(value, scale, fmt) -> str:
    return "—" if value is None else fmt.format(value * scale)


def _delta(a, b, scale, fmt, higher_better) -> str:
    if a is None or b is None:
        return "—"
    d = (b - a) * scale
    colour = "green" if (d > 0) == higher_better and d != 0 else ("red" if d != 0 else "dim")
    return f"[{colour}]{'+' if d >= 0 else ''}{fmt.format(d)}[/]"


def resolve_reference(ref: str) -> tuple[str, list]:
    """A sweep run id (→ its variant runs), a variant run id, or a registered NAME/VERSION or NAME@ALIAS
    (→ the run that produced it). Returns (label, runs)."""
    from ptqflow.tracking import registry
    from ptqflow.tracking import runs
    from ptqflow.tracking.keys import Tag

    if names_a_version(ref):
        named = parse_version_ref(ref)
        version = registry.resolve(named.name, version=named.version, alias=named.alias)
        return f"{named.name} v{version.version}", [runs.get_run(version.run_id)]
    run = runs.get_run(ref)
    if run.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP:
        children = sorted((r for r in runs.child_runs(ref)  # variants, not a resumed sweep's fallback search runs
                           if r.data.tags.get(Tag.ROLE, Tag.ROLE_VARIANT) == Tag.ROLE_VARIANT),
                          key=lambda r: r.info.start_time)
        return f"sweep {ref[:8]}", children
    return f"run {ref[:8]}", [run]


def print_comparison(refs: list[str]) -> None:
    """Two sweeps: per variant, side by side with deltas. Anything else: one row per run, deltas vs the first."""
    resolved = [resolve_reference(ref) for ref in refs]
    console = _console()
    if len(resolved) == 2 and all(len(r) > 1 for _, r in resolved):
        (label_a, runs_a), (label_b, runs_b) = resolved
        by_a = {r.info.run_name: r for r in runs_a}
        by_b = {r.info.run_name: r for r in runs_b}
        table = Table(title=f"{label_a} → {label_b}")
        table.add_column("variant", no_wrap=True)
        for _, header, *_ in COMPARED_METRICS:
            table.add_column(f"{header}: A → B (Δ)", justify="right", no_wrap=True)
        for name in dict.fromkeys([*by_a, *by_b]):
            a, b = by_a.get(name), by_b.get(name)
            cells = [name]
            for key, _, scale, fmt, better in COMPARED_METRICS:
                va = a.data.metrics.get(key) if a else None
                vb = b.data.metrics.get(key) if b else None
                cells.append(f"{_fmt(va, scale, fmt)} → {_fmt(vb, scale, fmt)} ({_delta(va, vb, scale, fmt, better)})")
            table.add_row(*cells)
        console.print(table)
        return
    table = Table(title="runs compared (Δ vs the first row)")
    for header in ("source", "variant", "run"):
        table.add_column(header, no_wrap=True)
    for _, header, *_ in COMPARED_METRICS:
        table.add_column(header, justify="right", no_wrap=True)
        table.add_column("Δ", justify="right", no_wrap=True)
    first = None
    for label, runs in resolved:
        for run in runs:
            first = first or run
            cells = [label, run.info.run_name or "", run.info.run_id[:8]]
            for key, _, scale, fmt, better in COMPARED_METRICS:
                value = run.data.metrics.get(key)
                cells += [_fmt(value, scale, fmt),
                          "" if run is first else _delta(first.data.metrics.get(key), value, scale, fmt, better)]
            table.add_row(*cells)
    console.print(table)


def print_registered_models(listing: list[dict]) -> None:
    """One row per version, then the gate's reason for each decision (a rejection says why it was rejected)."""
    from ptqflow.tracking.aliases import recorded_reason
    from ptqflow.tracking.keys import VersionTag as V

    table = Table(title="registered models")
    for header in ("model", "version", "aliases", "variant", "accuracy %", "Δ pp", "agreement %", "latency ms",
                   "gate", "source run"):
        table.add_column(header, no_wrap=True)
    reasons = []
    for entry in listing:
        tags = entry["tags"]

        def num(key, scale=1.0, fmt="{:.2f}"):
            return fmt.format(float(tags[key]) * scale) if key in tags else "—"

        source_run = entry.get("run_id") or tags.get(V.SOURCE_RUN_ID) or "—"
        table.add_row(entry["name"], entry["version"], ", ".join(f"@{a}" for a in entry["aliases"]) or "—",
                      tags.get(V.VARIANT, "—"), num(V.ACCURACY, 100), num(V.ACCURACY_DELTA_PP, fmt="{:+.2f}"),
                      num(V.TOP1_AGREEMENT, 100), num(V.LATENCY_MS_B1, fmt="{:.3f}"),
                      tags.get(V.PROMOTION_DECISION, "—"), source_run[:8])
        reason = recorded_reason(tags, entry.get("description"))
        if reason:
            reasons.append(f"{entry['name']} v{entry['version']} {tags.get(V.PROMOTION_DECISION, 'decided')}: "
                           f"{reason}")
    console = _console()
    console.print(table)
    for line in reasons:
        console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line per decision


def print_bench(results) -> None:
    from ptqflow.models.runtime.latency import CONTENDED_SPREAD

    table = Table(title="latency and throughput (real test images)")
    for header in ("model", "threads b1/b256", "b1 p50 ms", "b1 p90 ms", "b1 p90/p50", "b256 img/s", "µs/img b1",
                   "µs/img b256", "b256 speedup vs first"):
        table.add_column(header, justify="left" if header == "model" else "right", no_wrap=True)
    first = results[0][1].throughput_ips_b256 if results else None
    mark = report.CONTENDED_MARK

    def b256(r, text):  # a model whose batch is fixed at 1 has no batch-256 numbers
        return "—" if r.throughput_ips_b256 is None else text() + (mark if r.contended else "")

    for target, r in results:
        busy = mark if r.contended else ""
        table.add_row(target.label, f"{r.latency_threads or r.threads}/{r.threads}", f"{r.latency_ms_b1_p50:.3f}{busy}",
                      f"{r.latency_ms_b1_p90:.3f}{busy}",
                      f"{r.spread_b1:.2f}{busy}", b256(r, lambda: f"{r.throughput_ips_b256:.0f}"),
                      f"{1000 * r.latency_ms_b1_p50:.0f}{busy}", b256(r, lambda: f"{1e6 / r.throughput_ips_b256:.0f}"),
                      b256(r, lambda: f"{r.throughput_ips_b256 / first:.2f}x" if first else "—"))
    console = _console()
    console.print(table)
    if any(r.contended for _, r in results):
        console.print(f"[dim]{mark} timed while the machine was busy (p90/p50 of the timings above "
                      f"{CONTENDED_SPREAD:g}): not a measurement of the model[/]", highlight=False)


def print_tune(result) -> None:
    """A tune study's Pareto front (ptqflow.pipelines.tune.results.TuneResult), fastest first, and where it was logged."""
    console = _console()
    table = Table(title=f"{result.study}: Pareto front of {sum(t.state == 'COMPLETE' for t in result.trials)} "
                        "complete trials")
    for column in ("trial", "format", "agreement", "speed vs ORT FP32 (b256)", "feasible", "upgraded", "run"):
        table.add_column(column, justify="right" if column in ("trial", "agreement") else "left")
    for t in result.pareto:
        table.add_row(str(t.number), str(t.params.get("format", "")), f"{100 * t.agreement:.2f}%",
                      f"{t.speedup:.2f}x", "yes" if t.feasible else "no", str(t.params.get("upgrade_layers", 0)),
                      t.run_id[:8])
    console.print(table)
    for version in result.registered:
        console.print(f"registered {version.name} version {version.version}", highlight=False)
    console.print(f"tune parent run {result.parent_run_id}: tune/pareto.png, tune/pareto.md, tune/trials.csv",
                  highlight=False)
