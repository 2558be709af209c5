"""The figures and HTML page of a sweep: valid, readable-size PNGs, Pareto front, confusion counts, escaping."""

from __future__ import annotations

import csv
import io

import matplotlib.image
import numpy as np
import pytest

from pipelines import plots, report
from pipelines.tables import rows_from_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def variant_row(variant: str, accuracy: float | None, size_kib: float | None, agreement: float | None,
                status: str = "ok", reason: str = "", **extra) -> report.VariantRow:
    return report.VariantRow(
        variant=variant, framework="onnxruntime" if variant.startswith("ort") else "pytorch", backend="x86",
        weight_dtype="int8", activation_dtype="uint8", quant_format="QDQ", per_channel=True,
        calibration_method="minmax", status=status, accuracy=accuracy,
        accuracy_delta_pp=None if accuracy is None else 100 * (accuracy - 0.7551), top1_agreement=agreement,
        model_size_bytes=None if size_kib is None else int(size_kib * 1024), reason=reason, **extra)


ROWS = [
    variant_row("fp32", 0.7551, 316.2, None),
    variant_row("pytorch-fx-int8", 0.7503, 96.4, 0.9561),
    variant_row("pytorch-fx-int8-x86", 0.7497, 97.1, 0.9532),
    variant_row("pytorch-fx-uint8", None, None, None, status="unsupported", reason="no uint8 weight kernels"),
    variant_row("ort-int8", 0.7489, 94.2, 0.9447),
    variant_row("ort-uint8", 0.7472, 94.3, 0.9318),
]
LATENCY_MS = {"fp32": 0.41, "pytorch-fx-int8": 0.29, "ort-int8": 0.20}


def per_class_sample() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    return {r.variant: dict(zip(CLASS_NAMES, rng.uniform(0.5, 0.9, len(CLASS_NAMES)))) for r in ROWS if r.accuracy}


def confusion_sample() -> bytes:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    predictions = np.where(rng.random(500) < 0.75, labels, rng.integers(0, 10, 500))
    return plots.confusion_matrix(labels, predictions, CLASS_NAMES, "ort-int8 <test>")


@pytest.mark.parametrize("render", [
    lambda: plots.accuracy_vs_size(ROWS),
    lambda: plots.accuracy_vs_latency(ROWS, LATENCY_MS),
    lambda: plots.accuracy_vs_latency(ROWS, {}),
    lambda: plots.per_class_accuracy(per_class_sample()),
    lambda: plots.agreement(ROWS),
    lambda: plots.agreement(ROWS, target=0.95),
    confusion_sample,
], ids=["size", "latency", "latency-none", "per-class", "agreement", "agreement-target", "confusion"])
def test_plot_is_a_readable_png(render):
    png = render()
    assert png.startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(io.BytesIO(png))
    height, width = pixels.shape[:2]
    assert width >= 600 and height >= 250
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(1.0, 1.0)], [0]),
    # Unsorted input: indices refer to the input order, the result is ordered by x.
    ([(300.0, 0.76), (95.0, 0.75), (94.0, 0.74)], [2, 1, 0]),
    # Same size, lower accuracy is dominated; same accuracy, larger size is dominated.
    ([(94.0, 0.75), (94.0, 0.74), (120.0, 0.75), (316.0, 0.76)], [0, 3]),
    # A point dominated only by a later, smaller-and-better one (a single left-to-right pass keeps it).
    ([(100.0, 0.70), (200.0, 0.72), (90.0, 0.73)], [2]),
    # Exact duplicates dominate neither other: both stay.
    ([(94.0, 0.75), (94.0, 0.75)], [0, 1]),
])
def test_pareto_front(points, expected):
    assert plots.pareto_front(points) == expected


def test_confusion_counts():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0],
                         [0, 1, 0],
                         [1, 0, 2]])
    counts = plots.confusion_counts(labels, predictions, num_classes=3)
    np.testing.assert_array_equal(counts, expected)
    # A class nobody predicts or belongs to still has its row and column.
    assert plots.confusion_counts(np.array([0]), np.array([0]), num_classes=4).shape == (4, 4)


def test_html_escapes_and_has_every_column():
    rows = [*ROWS, variant_row("<script>alert(1)</script>", None, None, None, status="failed",
                               reason="bad <script>x</script> & more")]
    page = report.to_html(rows, title="sweep <b>1</b>")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;script&gt;x&lt;/script&gt; &amp; more" in page
    assert "sweep &lt;b&gt;1&lt;/b&gt;" in page
    for header, _ in report.COLUMNS:
        assert f"<th>{header}</th>" in page
    assert 'class="failed"' in page and 'class="unsupported"' in page
    assert "http" not in page and "src=" not in page  # self-contained


def test_new_columns_are_formatted():
    row = variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1=0.19849, speedup_vs_fp32=2.0612)
    assert report.cell(row, "latency_ms_b1") == "0.198"
    assert report.cell(row, "speedup_vs_fp32") == "2.06x"
    assert "| 0.198 | 2.06x | ok |" in report.to_markdown([row])


def test_csv_round_trip_with_latency():
    rows = [variant_row("fp32", 0.7551, 316.2, None, latency_ms_b1=0.412, speedup_vs_fp32=1.0),
            variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1=0.198, speedup_vs_fp32=2.08),
            variant_row("pytorch-fx-uint8", None, None, None, status="unsupported", reason="no, \"uint8\" kernels"),
            report.VariantRow(variant="x", framework="f", backend="b", weight_dtype="w", activation_dtype="a",
                              quant_format="q", per_channel=None, calibration_method="c", status="failed")]
    assert rows_from_csv(report.to_csv(rows)) == rows


def test_csv_without_latency_columns_still_reads():
    """Comparison CSVs logged before latency was measured lack the two columns."""
    records = list(csv.DictReader(io.StringIO(report.to_csv(ROWS[:2]))))
    old_fields = [f for f in records[0] if f not in ("latency_ms_b1", "speedup_vs_fp32")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=old_fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    assert rows_from_csv(out.getvalue()) == ROWS[:2]
