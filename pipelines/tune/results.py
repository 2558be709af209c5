"""What a tune study ends with: each trial's result, the Pareto front of agreement and speed, the best feasible
trial, and how they are written (CSV, Markdown, the summary line)."""

from __future__ import annotations

from dataclasses import dataclass, field

import time

from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.tune.options import TuneOptions
from ptqflow.tracking import records
from ptqflow.tracking.keys import Artifact, Metric

TRIAL_RUN_ATTR = "mlflow_run_id"  # trial user attribute
CONSTRAINTS_ATTR = "constraints"  # trial user attribute: [agreement, speed] shortfalls, <= 0 feasible
FAILURE_ATTR = "failure"  # trial user attribute: why the config could not be made or measured


@dataclass
class TrialResult:
    number: int
    params: dict
    agreement: float | None
    speedup: float | None
    accuracy: float | None
    run_id: str
    feasible: bool
    state: str
    worker: str = ""

    def row(self) -> dict:
        return {"trial": self.number, "state": self.state, "top1_agreement": self.agreement,
                "speedup_vs_ort_fp32_b256": self.speedup, "accuracy": self.accuracy, "feasible": self.feasible,
                "run_id": self.run_id, **{k: self.params[k] for k in sorted(self.params)}}


@dataclass
class TuneResult:
    study: str
    parent_run_id: str
    trials: list[TrialResult]
    pareto: list[TrialResult]
    best: TrialResult | None  # the best feasible trial (agreement, then speed), or None
    registered: list = field(default_factory=list)
    finished_parent: bool = False  # this worker was the last and ended the parent run


def constraints(trial) -> list[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, [1.0, 1.0])


def feasible(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in constraints(trial))


def pareto(trials: list[TrialResult]) -> list[TrialResult]:
    """The trials no other beats on both agreement and speed, fastest first."""
    points = [(-t.speedup, t.agreement) for t in trials]
    return [trials[i] for i in plots.pareto_front(points)]


def pareto_markdown(front: list[TrialResult], best: TrialResult | None, options: TuneOptions) -> str:
    lines = [f"# Pareto front of {options.study_name}", "",
             f"Target: top-1 agreement >= {100 * options.target_agreement:g}% and >= {options.min_speedup:g}x ORT "
             "FP32 batch-256 throughput (same process).", "",
             "| trial | format | agreement | speed vs ORT FP32 (b256) | feasible | upgraded layers | run |",
             "|---|---|---|---|---|---|---|"]
    for t in front:
        lines.append(f"| {t.number} | {t.params.get('format', '')} | {100 * t.agreement:.2f}% | {t.speedup:.2f}x | "
                     f"{'yes' if t.feasible else 'no'} | {t.params.get('upgrade_layers', 0)} | {t.run_id[:8]} |")
    lines += ["", f"Best feasible: trial {best.number}" if best else "No trial met the target."]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    import csv
    import io

    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary_line(result: TuneResult, options: TuneOptions) -> str:
    done = sum(t.state == "COMPLETE" for t in result.trials)
    if result.best is None:
        return (f"[yellow]![/] {done} trials, none reached {100 * options.target_agreement:g}% agreement at "
                f">= {options.min_speedup:g}x ORT FP32; Pareto front of {len(result.pareto)} on parent run "
                f"{result.parent_run_id}")
    b = result.best
    return (f"[green]✓[/] best feasible: trial {b.number} ({b.params.get('format')}), agreement "
            f"{100 * b.agreement:.2f}%, {b.speedup:.2f}x ORT FP32 (b256); {done} trials, parent run "
            f"{result.parent_run_id}")


def trial_result(t) -> TrialResult:
    """An Optuna trial as a TrialResult."""
    values = t.values or [None, None]
    return TrialResult(t.number, dict(t.params), values[0], values[1], t.user_attrs.get("accuracy"),
                       t.user_attrs.get(TRIAL_RUN_ATTR, ""), feasible(t), t.state.name, t.user_attrs.get("worker", ""))


def log_front(parent_run_id: str, trials: list[TrialResult], front: list[TrialResult], best: TrialResult | None,
              options: TuneOptions, started: float, test_images: int) -> None:
    """The trials, the Pareto front (CSV, Markdown, plot) and the study's metrics on the parent run; `started` is
    the worker's time.monotonic() at its start."""
    records.log_text_to_run(parent_run_id, to_csv([t.row() for t in trials]), Artifact.TUNE_TRIALS_CSV)
    records.log_text_to_run(parent_run_id, to_csv([t.row() for t in front]), Artifact.TUNE_PARETO_CSV)
    records.log_text_to_run(parent_run_id, pareto_markdown(front, best, options), Artifact.TUNE_PARETO_MD)
    png = plots.tune_pareto(
        [(t.speedup, t.agreement, t.params.get("format", "?")) for t in trials if t.state == "COMPLETE"],
        [(t.speedup, t.agreement) for t in front],
        (best.speedup, best.agreement) if best else None, options.target_agreement,
        options.min_speedup, f"{options.study_name}: {len(trials)} trials")
    records.log_bytes_to_run(parent_run_id, png, Artifact.TUNE_PARETO_PLOT)
    M = Metric
    metrics = {M.TUNE_TRIALS: len(trials), M.TUNE_PARETO_SIZE: len(front), M.TUNE_SECONDS: time.monotonic() - started}
    if best is not None:
        metrics.update({M.BEST_FEASIBLE_AGREEMENT: best.agreement, M.BEST_FEASIBLE_SPEEDUP_B256: best.speedup})
    records.log_metrics_to_run(parent_run_id, precision.rounded(metrics, test_images))
