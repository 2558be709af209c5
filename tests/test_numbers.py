"""Numbers as the measurement supports them: metrics rounded at the source (no float noise in the store or the
comparison files), speedups named by batch size and defined when a model has no batch-256 throughput, contended
timings flagged, and the agreement plot drawn at the gate's own limit."""

from __future__ import annotations

import csv
import io
import re

import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, _point_mlflow_at

from ptqflow.models.runtime.latency import CONTENDED_SPREAD, BenchResult, RoundsResult
from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.registry.gate import GatePolicy
from ptqflow.tracking.keys import Metric, Tag

NOISY = -0.15000000000000568  # accuracy_delta_pp as it was logged
VARIANTS = ("pytorch-fx-int8", "ort-int8")
# Synthetic timings with every digit a float division leaves: one wide (p90 = 300 x p50), the others tight.
BENCH = {
    "fp32": BenchResult(0.41234567891, 0.45678912345, 3456.789123456, 2, 1.0712345678),
    "pytorch-fx-int8": BenchResult(0.42712345678, 128.123456789, 5012.3456789, 2, 1.1234567),
    "ort-int8": BenchResult(0.19876543211, 0.23456789012, 7890.12345678, 2, 1.0456789),
}
CONTENDED = "pytorch-fx-int8"
# Not the default, so the plot must have been given the sweep's own; loose enough that the tiny model's first
# version becomes @champion.
GATE = GatePolicy(max_accuracy_drop_pp=100.0, min_agreement=0.5, allow_slower=True)


def significant_digits(value: float) -> int:
    """Digits in the shortest repr that round-trips: a float-noise value has 15-17."""
    mantissa = repr(abs(value)).split("e")[0].replace(".", "").strip("0")
    return len(mantissa)


# ---- the precision table ---------------------------------------------------------------------------------------
def test_every_metric_has_a_precision():
    keys = {v for k, v in vars(Metric).items() if not k.startswith("_") and isinstance(v, str)}
    assert keys <= set(precision.METRICS), keys - set(precision.METRICS)


def test_unknown_metrics_are_refused():
    with pytest.raises(KeyError, match="no precision"):
        precision.rounded({"made_up_metric": 1.0}, 100)


@pytest.mark.parametrize("key, value, test_images, expected", [
    (Metric.ACCURACY_DELTA_PP, NOISY, 10_000, -0.15),
    (Metric.ACCURACY_DELTA_PP, -0.009999999999998899, 10_000, -0.01),
    (Metric.ACCURACY, 0.7548000000000001, 10_000, 0.7548),
    (Metric.ACCURACY, 0.77, 1000, 0.77),
    (Metric.TOP1_AGREEMENT, 2 / 3, 300, 0.667),  # 3 decimals keep every count of 300 distinct
    (Metric.TOP1_AGREEMENT, 0.98419999999, 10_000, 0.9842),
    (Metric.LATENCY_MS_B1_P50, 0.41234567891, None, 0.412),  # 1 µs
    (Metric.SPEEDUP_VS_FP32_B256, 2.0612345, None, 2.06),  # 3 significant digits
    (Metric.SPEEDUP_VS_FP32_B1, 0.0016612, None, 0.00166),
    (Metric.THROUGHPUT_IPS_B256, 3456.789123, None, 3460.0),
    (Metric.COMPRESSION_RATIO, 3.3557046979865772, None, 3.36),
    (Metric.MODEL_SIZE_BYTES, 94321, None, 94321.0),
    (Metric.SQNR_DB, float("inf"), None, float("inf")),
    (Metric.KL_DIVERGENCE, 0.0, None, 0.0),
])
def test_rounding(key, value, test_images, expected):
    assert precision.round_metric(key, value, test_images) == expected


def test_rounded_drops_missing_values_and_needs_the_test_set_size_for_shares():
    assert precision.rounded({Metric.THROUGHPUT_IPS_B256: None, Metric.LATENCY_MS_B1_P50: 1.23456}) == {
        Metric.LATENCY_MS_B1_P50: 1.235}
    with pytest.raises(ValueError, match="number of images"):
        precision.rounded({Metric.ACCURACY: 0.5})


@pytest.mark.parametrize("images, decimals", [(1, 0), (10, 1), (100, 2), (300, 3), (1000, 3), (10_000, 4)])
def test_share_decimals_follow_the_test_set(images, decimals):
    assert precision.share_decimals(images) == decimals
    counts = {round(k / images, decimals) for k in range(images + 1)}
    assert len(counts) == images + 1  # no two counts collapse


# ---- contention ------------------------------------------------------------------------------------------------
def test_wide_spread_is_contended_and_tight_is_not():
    wide = BenchResult(0.4, 128.0, 3000.0, 2, 1.05)  # the p90 logged on a busy machine
    tight = BenchResult(0.4, 0.46, 3000.0, 2, 1.05)
    assert wide.spread_b1 == pytest.approx(320) and wide.contended
    assert tight.spread_b1 == pytest.approx(1.15) and not tight.contended
    assert BenchResult(0.4, 0.46, 3000.0, 2, 2.5).contended  # batch-256 timings spread too
    assert not BenchResult(0.4, 0.46, None, 2).contended  # fixed batch 1: no batch-256 timings
    assert not BenchResult(0.4, 0.4 * CONTENDED_SPREAD, 3000.0, 2).contended  # the threshold itself is allowed


def test_benchmark_records_both_spreads():
    import numpy as np

    from ptqflow.models.runtime.latency import BenchConfig, benchmark

    result = benchmark(lambda threads: (lambda x: x * 2), np.zeros((4, 3), np.float32),
                       BenchConfig(warmup_runs=2, latency_runs=20, throughput_runs=5, threads=1))
    assert result.spread_b1 >= 1 and result.spread_b256 is not None and result.spread_b256 >= 1
    fixed = benchmark(lambda threads: (lambda x: x), np.zeros((1, 3), np.float32),
                      BenchConfig(warmup_runs=1, latency_runs=5, throughput_runs=2, threads=1), throughput=False)
    assert fixed.throughput_ips_b256 is None and fixed.spread_b256 is None


def test_speedups_without_batch_256_throughput():
    """A model whose batch is fixed at 1 has no throughput: the b256 speedup is absent, b1 still defined."""
    from ptqflow.pipelines.sweep.outcomes import speedup_b1, speedup_b256

    fixed, reference = BenchResult(0.2, 0.25, None, 2), BenchResult(0.4, 0.5, None, 2)
    assert speedup_b256(fixed, reference) is None and speedup_b1(fixed, reference) == pytest.approx(2.0)
    assert speedup_b256(BenchResult(0.2, 0.25, 500.0, 2), BenchResult(0.4, 0.5, 250.0, 2)) == pytest.approx(2.0)
    assert speedup_b1(None, reference) is None and speedup_b256(fixed, None) is None


def test_bench_table_with_a_fixed_batch_model(capsys):
    from ptqflow.pipelines.sweep.bench import BenchTarget
    from ptqflow.pipelines.reports.tables import print_bench

    targets = [BenchTarget("fixed.onnx", None, "NHWC", "raw"), BenchTarget("busy.onnx", None, "NHWC", "raw")]
    print_bench([(targets[0], BenchResult(0.2, 0.25, None, 2)), (targets[1], BenchResult(0.2, 64.0, 900.0, 2))])
    out = capsys.readouterr().out
    assert "fixed.onnx" in out and "—" in out
    assert "64.000" + report.CONTENDED_MARK in out and "machine was busy" in out


# ---- a real sweep, read back from its sqlite store -------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, cifar_dir, tiny_model):
    """A tiny two-variant sweep whose timings are BENCH (so contention is deterministic); records what the
    agreement plot was asked to draw."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.pipelines.variants.runner import VariantRunner

    root = tmp_path_factory.mktemp("numbers_store")
    drawn = {}
    real_agreement = plots.agreement

    def spy_agreement(rows, min_agreement):
        drawn["min_agreement"] = min_agreement
        return real_agreement(rows, min_agreement)

    with pytest.MonkeyPatch.context() as mp:
        _point_mlflow_at(mp, root)
        mp.setattr(VariantRunner, "bench_together", lambda self, models: RoundsResult(
            {name: BENCH[name] for name in ("fp32", *(name for name, _, _, _ in models))}, {}))
        mp.setattr(plots, "agreement", spy_agreement)
        result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, variants=VARIANTS,
                                        calibration_size=CALIBRATION_SIZE, adaround_iterations=ADAROUND_ITERATIONS,
                                        gate=GATE))
        yield result, drawn
        import mlflow

        mlflow.set_tracking_uri(None)


def _runs(result):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{Tag.SWEEP_RUN_ID}` = '{result.parent_run_id}'", max_results=100)
    return parent, {r.info.run_name: r for r in children}


def test_logged_metrics_have_no_float_noise(sweep_store):
    result, _ = sweep_store
    parent, children = _runs(result)
    assert set(children) == {"fp32", *VARIANTS}
    test_images = int(children["fp32"].data.metrics[Metric.TEST_IMAGES])
    checked = 0
    for run in [parent, *children.values()]:
        for key, value in run.data.metrics.items():
            assert value == precision.round_metric(key, value, test_images), (run.info.run_name, key, value)
            assert significant_digits(value) <= 7, (run.info.run_name, key, value)
            checked += 1
    assert checked > 40
    m = children["ort-int8"].data.metrics
    assert m[Metric.LATENCY_MS_B1_P50] == 0.199 and m[Metric.LATENCY_MS_B1_P90] == 0.235
    assert m[Metric.THROUGHPUT_IPS_B256] == 7890.0 and m[Metric.SPREAD_B256] == 1.05
    assert m[Metric.SPEEDUP_VS_FP32_B1] == 2.07  # 0.41234567891 / 0.19876543211
    assert m[Metric.SPEEDUP_VS_FP32_B256] == 2.28  # 7890.12345678 / 3456.789123456
    assert re.fullmatch(r"-?\d+(\.\d{1,2})?", repr(m[Metric.ACCURACY_DELTA_PP]))
    assert Metric.SPEEDUP_VS_FP32_B256 in children["fp32"].data.metrics  # 1.0: FP32 times against itself


def test_comparison_files_have_no_float_noise(sweep_store):
    from ptqflow.tracking.records import download_text

    result, _ = sweep_store
    text = download_text(result.parent_run_id, "comparison.csv")
    numeric = [f for f in report.NUMERIC_FIELDS if f != "model_size_bytes"]
    for record in csv.DictReader(io.StringIO(text)):
        for field in numeric:
            if record[field] not in ("", "None"):
                assert significant_digits(float(record[field])) <= 7, (record["variant"], field, record[field])
    for row in result.rows:
        if row.accuracy_delta_pp is not None:
            assert row.accuracy_delta_pp == round(row.accuracy_delta_pp, 2)


def test_contended_run_is_flagged(sweep_store):
    result, _ = sweep_store
    _, children = _runs(result)
    for name, run in children.items():
        busy = name == CONTENDED
        assert run.data.metrics[Metric.BENCH_CONTENDED] == (1.0 if busy else 0.0), name
        assert (Tag.BENCH_CONTENDED in run.data.tags) == busy, name
    assert children[CONTENDED].data.metrics[Metric.SPREAD_B1] == 300.0
    assert "batch-1 p90/p50 299.97" in children[CONTENDED].data.tags[Tag.BENCH_CONTENDED]
    assert {r.variant: r.contended for r in result.rows} == {"fp32": False, CONTENDED: True, "ort-int8": False}


def test_contended_timings_are_marked_in_the_sweeps_tables(sweep_store):
    from ptqflow.tracking.records import download_text

    result, _ = sweep_store
    mark = report.CONTENDED_MARK
    markdown = download_text(result.parent_run_id, "comparison.md")
    busy_line = next(line for line in markdown.splitlines() if line.startswith(f"| {CONTENDED} "))
    assert "0.427" + mark in busy_line
    quiet_line = next(line for line in markdown.splitlines() if line.startswith("| ort-int8 "))
    assert mark not in quiet_line and report.CONTENDED_NOTE in markdown
    records = {r["variant"]: r for r in csv.DictReader(io.StringIO(
        download_text(result.parent_run_id, "comparison.csv")))}
    assert records[CONTENDED]["contended"] == "True" and records["ort-int8"]["contended"] == "False"


def test_comparison_page_links_runs_and_marks_best_and_champion(sweep_store):
    from ptqflow.pipelines.registry.gate import CHAMPION_ALIAS
    from ptqflow.tracking import aliases
    from ptqflow.tracking.records import download_text

    result, _ = sweep_store
    page = download_text(result.parent_run_id, "comparison.html")
    parent, children = _runs(result)
    experiment = parent.info.experiment_id
    for name, run in children.items():  # a local store: links go where `mlflow ui` serves it
        assert (f'<a href="http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.info.run_id}"' in page), name
    best = report.best_variant(result.rows)
    assert best is not None and 'class="mark best"' in page
    row_of = {line.split("runs/")[1][:32]: line for line in page.splitlines() if line.startswith("<tr")}
    assert 'class="mark best"' in row_of[best.run_id]
    marked = 0
    for name in ("resnet8-int8", "resnet8-int8-onnx"):
        champion = aliases.alias_target(name, CHAMPION_ALIAS)
        assert champion is not None, name  # a fresh store and a loose gate: the first versions are champions
        assert f'class="mark champion" title="{name} v{champion.version}"' in row_of[champion.run_id]
        marked += 1
    assert sum('class="mark champion"' in line for line in row_of.values()) == marked


def test_agreement_plot_uses_the_sweeps_gate(sweep_store):
    _, drawn = sweep_store
    assert drawn["min_agreement"] == GATE.min_agreement
