"""The figures and HTML page of a sweep: valid, readable-size PNGs, what each figure draws (Pareto fronts, coincident
markers, the gate's agreement limit, per-class differences from FP32), confusion counts, and the comparison page
(escaping, batch sizes in headers, run links, best and champion marks, contended timings, width on a laptop)."""

from __future__ import annotations

import csv
import html
import io
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from ptqflow.pipelines.reports import plots

from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.registry.gate import GatePolicy
from ptqflow.pipelines.reports.tables import rows_from_csv

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
    lambda: plots.agreement(ROWS, GatePolicy().min_agreement),
    lambda: plots.agreement(ROWS, 0.95),
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
    for header, _, _ in report.HTML_COLUMNS:
        assert f"<th>{header}</th>" in page
    assert 'class="failed"' in page and 'class="unsupported"' in page
    assert "http" not in page and "src=" not in page  # self-contained


def test_html_shows_every_field():
    """The page merges columns to fit a laptop screen, but drops none."""
    shown = [f for _, fields, _ in report.HTML_COLUMNS for f in fields]
    assert sorted(shown) == sorted(f for _, f in report.COLUMNS)


def test_new_columns_are_formatted():
    row = variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1_p50=0.19849, speedup_b1_vs_fp32=0.23,
                      speedup_b256_vs_fp32=4.37)
    assert report.cell(row, "latency_ms_b1_p50") == "0.198"
    assert report.cell(row, "speedup_b256_vs_fp32") == "4.37x"
    assert "| 0.198 | 0.230x | 4.37x | ok |" in report.to_markdown([row])


def test_timing_headers_name_their_batch_size():
    """"speedup" at batch 256 beside a batch-1 latency read as one number: every timing header says its batch."""
    from ptqflow.pipelines.reports.tables import COMPARED_METRICS, TERMINAL_COLUMNS

    timing = {"latency_ms_b1_p50": "b1", "speedup_b1_vs_fp32": "b1", "speedup_b256_vs_fp32": "b256"}
    headers = {f: h for h, f in report.COLUMNS}
    assert set(timing) <= set(headers)
    for field, batch in timing.items():
        assert headers[field].startswith(batch + " "), headers[field]
        assert field.endswith(batch) or f"_{batch}_" in field  # the CSV column names it too
        assert ("speedup" in headers[field]) == ("speedup" in field)
    html_headers = {fields: h for h, fields, _ in report.HTML_COLUMNS}
    for field, batch in timing.items():
        assert html_headers[(field,)].startswith(batch + " ")
    assert all(h == headers[f] for h, f in TERMINAL_COLUMNS)
    compared = {key: header for key, header, *_ in COMPARED_METRICS}
    assert compared["latency_ms_b1_p50"].startswith("b1 ") and compared["throughput_ips_b256"].startswith("b256 ")
    assert "> 1 = faster" in report.SPEEDUP_NOTE
    page, markdown = report.to_html(ROWS), report.to_markdown(ROWS)
    assert html.escape(report.SPEEDUP_NOTE) in page and report.SPEEDUP_NOTE in markdown
    assert "speedup_b256_vs_fp32" in report.to_csv(ROWS).splitlines()[0]


def test_csv_round_trip_with_latency():
    rows = [variant_row("fp32", 0.7551, 316.2, None, latency_ms_b1_p50=0.412, speedup_b1_vs_fp32=1.0,
                        speedup_b256_vs_fp32=1.0, contended=False),
            variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1_p50=0.198, speedup_b1_vs_fp32=2.08,
                        speedup_b256_vs_fp32=None, contended=True),
            variant_row("pytorch-fx-uint8", None, None, None, status="unsupported", reason="no, \"uint8\" kernels"),
            report.VariantRow(variant="x", framework="f", backend="b", weight_dtype="w", activation_dtype="a",
                              quant_format="q", per_channel=None, calibration_method="c", status="failed")]
    assert rows_from_csv(report.to_csv(rows)) == rows


def _rewrite_csv(text: str, rename: dict[str, str] = {}, drop: tuple[str, ...] = ()) -> str:
    records = list(csv.DictReader(io.StringIO(text)))
    fields = [rename.get(f, f) for f in records[0] if f not in drop]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({rename.get(k, k): v for k, v in r.items()} for r in records)
    return out.getvalue()


def test_csv_without_latency_columns_still_reads():
    """Comparison CSVs logged before latency was measured lack the timing columns."""
    old = _rewrite_csv(report.to_csv(ROWS[:2]), drop=("latency_ms_b1_p50", "speedup_b1_vs_fp32",
                                                      "speedup_b256_vs_fp32", "contended"))
    assert rows_from_csv(old) == ROWS[:2]


def test_csv_with_old_timing_names_still_reads():
    """Before the columns named their batch size: latency_ms_b1 and speedup_vs_fp32 (batch 256)."""
    rows = [variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1_p50=0.198, speedup_b256_vs_fp32=2.08)]
    old = _rewrite_csv(report.to_csv(rows), rename={"latency_ms_b1_p50": "latency_ms_b1",
                                                    "speedup_b256_vs_fp32": "speedup_vs_fp32"},
                       drop=("speedup_b1_vs_fp32", "contended"))
    assert "speedup_vs_fp32" in old.splitlines()[0]
    assert rows_from_csv(old) == rows


# ---- what the figures draw -----------------------------------------------------------------------------------------
def _artist(fig, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"{gid}: {len(found)} artists"
    return found[0]


def _marker_pixels(fig, name: str) -> np.ndarray:
    """Where a variant's marker is drawn, in pixels (after layout)."""
    fig.canvas.draw()
    line = _artist(fig, f"marker:{name}")
    return line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]))[0]


def _on_staircase(xs, ys, point) -> bool:
    """The point is one of the staircase's corners."""
    return any(np.isclose(x, point[0]) and np.isclose(y, point[1]) for x, y in zip(xs, ys))


@pytest.mark.parametrize("kind", ["size", "latency"])
def test_pareto_front_is_drawn_through_its_points(kind):
    fig = (plots.accuracy_vs_size_figure(ROWS) if kind == "size"
           else plots.accuracy_vs_latency_figure(ROWS, LATENCY_MS))
    shown = [r for r in ROWS if r.accuracy is not None and (kind == "size" or r.variant in LATENCY_MS)]
    points = [((r.model_size_bytes / 1024) if kind == "size" else LATENCY_MS[r.variant], 100 * r.accuracy)
              for r in shown]
    front = plots.pareto_front(points)
    assert len(front) >= 2
    line = _artist(fig, "pareto-front")
    xs, ys = line.get_xdata(), line.get_ydata()
    assert line.get_visible() and len(xs) >= 2 * len(front)
    for i in front:
        assert _on_staircase(xs, ys, points[i])
    for i in set(range(len(points))) - set(front):  # dominated points are off it
        assert not _on_staircase(xs, ys, points[i])
    # Each step goes right or up: a staircase, not a zigzag.
    assert np.all(np.diff(xs) >= 0) and np.all(np.diff(ys) >= 0)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Pareto front" in labels and "on the Pareto front" in labels


def test_a_front_of_one_point_is_still_drawn():
    """When one variant is both smallest and most accurate, the front is that point: the legend's line must still
    appear, as the edges of the region it dominates."""
    rows = [variant_row("fp32", 0.7548, 308.7, None), variant_row("ort-uint8", 0.7556, 92.0, 0.9873),
            variant_row("ort-int8", 0.7542, 105.0, 0.9840)]
    fig = plots.accuracy_vs_size_figure(rows)
    line = _artist(fig, "pareto-front")
    xs, ys = line.get_xdata(), line.get_ydata()
    ax = fig.axes[0]
    assert _on_staircase(xs, ys, (92.0, 75.56))
    assert np.isclose(ys[0], ax.get_ylim()[0]) and np.isclose(xs[-1], ax.get_xlim()[1])  # edge to edge
    assert np.ptp(xs) > 0 and np.ptp(ys) > 0


def test_coincident_points_stay_visible():
    """Two variants with the same size and accuracy are drawn side by side, each marker clear of the other, and
    each label's leader line ends at its own marker."""
    rows = [variant_row("fp32", 0.7548, 308.7, None), variant_row("pytorch-fx-int8", 0.7533, 149.0, 0.9842),
            variant_row("pytorch-fx-int8-x86", 0.7533, 149.0, 0.9842), variant_row("ort-int8", 0.7542, 105, 0.984)]
    fig = plots.accuracy_vs_size_figure(rows)
    a, b = _marker_pixels(fig, "pytorch-fx-int8"), _marker_pixels(fig, "pytorch-fx-int8-x86")
    marker_px = _artist(fig, "marker:pytorch-fx-int8").get_markersize() * plots.DPI / 72
    assert np.hypot(*(a - b)) > marker_px
    assert abs(a[1] - b[1]) < 1  # side by side: the accuracy is still read off the same height
    # A lone point is not moved.
    ax = fig.axes[0]
    alone = _marker_pixels(fig, "ort-int8")
    np.testing.assert_allclose(alone, ax.transData.transform((105, 75.42)), atol=0.5)
    for name, marker in (("pytorch-fx-int8", a), ("pytorch-fx-int8-x86", b)):
        label = _artist(fig, f"label:{name}")
        np.testing.assert_allclose(label.xycoords.transform(label.xy), marker, atol=0.5)


def _label_boxes(fig) -> dict[str, object]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    # The text alone: an annotation's own extent includes its leader line.
    return {a.get_gid(): Text.get_window_extent(a, renderer) for a in fig.axes[0].texts
            if (a.get_gid() or "").startswith("label:")}


def test_labels_never_overlap_each_other_or_other_markers():
    """The sweep's real pattern: a slow outlier, two FX variants on one spot, ORT variants at one accuracy."""
    rows = [variant_row("fp32", 0.770, 308.8, None), variant_row("pytorch-fx-int8", 0.773, 150.6, 0.979),
            variant_row("pytorch-fx-int8-x86", 0.773, 151.3, 0.979), variant_row("ort-int8", 0.769, 105.3, 0.98),
            variant_row("ort-uint8", 0.771, 92.2, 0.962), variant_row("ort-int8-u8s8", 0.769, 93.9, 0.98)]
    latency = {"fp32": 0.349, "pytorch-fx-int8": 0.597, "pytorch-fx-int8-x86": 113.8, "ort-int8": 0.521,
               "ort-uint8": 0.491, "ort-int8-u8s8": 0.294}
    for fig in (plots.accuracy_vs_size_figure(rows),
                plots.accuracy_vs_latency_figure(rows, latency, {"ort-int8", "pytorch-fx-int8"})):
        boxes = {gid.removeprefix("label:"): box for gid, box in _label_boxes(fig).items()}
        assert len(boxes) == len(rows)
        markers = {name: _marker_pixels(fig, name) for name in boxes}  # labels and markers share the name
        names = list(boxes)
        for k, a in enumerate(names):
            for b in names[:k]:
                assert not boxes[a].overlaps(boxes[b]), (a, b)
            for b in names:
                if b != a:
                    assert not boxes[a].contains(*markers[b]), f"label {a} covers marker {b}"


def test_latency_axis_turns_logarithmic_for_an_outlier():
    """One variant 300 times slower would squeeze the others into a line at zero (and put negative latencies on
    the axis)."""
    quiet = plots.accuracy_vs_latency_figure(ROWS, LATENCY_MS)
    assert quiet.axes[0].get_xscale() == "linear"
    slow = plots.accuracy_vs_latency_figure(ROWS, {**LATENCY_MS, "ort-int8": 120.0})
    ax = slow.axes[0]
    assert ax.get_xscale() == "log" and "log" in ax.get_xlabel() and ax.get_xlim()[0] > 0
    x_low, x_high = ax.get_xlim()
    assert all(x_low < v < x_high for v in (0.41, 0.29, 120.0))


def test_marker_offsets_leave_distinct_points_alone():
    fig = plots.accuracy_vs_size_figure(ROWS)
    ax = fig.axes[0]
    assert plots.marker_offsets(ax, [(100, 75.0), (300, 76.0)]) == [(0.0, 0.0), (0.0, 0.0)]
    three = plots.marker_offsets(ax, [(150, 75.3)] * 3)
    moved = [np.array(o) for o in three]
    assert all(np.hypot(*(p - q)) >= plots.COINCIDENT_IN - 1e-9 for k, p in enumerate(moved) for q in moved[:k])


def test_latency_plot_says_which_latency():
    fig = plots.accuracy_vs_latency_figure(ROWS, LATENCY_MS, contended={"ort-int8"})
    ax = fig.axes[0]
    assert "batch-1" in ax.get_xlabel() and "p50" in ax.get_xlabel()
    assert "batch-1" in ax.get_title() and "p50" in ax.get_title()
    assert plots.CONTENDED_LABEL in _artist(fig, f"label:ort-int8 {plots.CONTENDED_LABEL}").get_text()


@pytest.mark.parametrize("min_agreement", [GatePolicy().min_agreement, 0.95, 0.9825])
def test_agreement_plot_draws_the_gates_limit(min_agreement):
    fig = plots.agreement_figure(ROWS, min_agreement)
    line = _artist(fig, "gate-limit")
    assert np.allclose(line.get_xdata(), 100 * min_agreement)
    assert f"{round(100 * min_agreement, 4):g}%" in line.get_label()
    # Bars are coloured against the same limit.
    bars = [p for p in fig.axes[0].patches]
    shown = [r for r in ROWS if r.variant != "fp32" and r.top1_agreement is not None]
    for bar, row in zip(bars, shown):
        passes = row.top1_agreement >= min_agreement
        assert matplotlib.colors.to_hex(bar.get_facecolor()) == (plots.MEETS_TARGET_COLOR if passes
                                                                  else plots.BELOW_TARGET_COLOR)


def test_per_class_plot_draws_differences_from_fp32():
    per_class = per_class_sample()
    fig = plots.per_class_accuracy_figure(per_class)
    ax = fig.axes[0]
    assert "pp" in ax.get_ylabel() and "FP32" in ax.get_title()
    for variant, accuracies in per_class.items():
        if variant == "fp32":
            assert not [a for a in ax.get_children() if a.get_gid() == "delta:fp32"]
            continue
        drawn = _artist(fig, f"delta:{variant}").get_ydata()
        expected = [100 * (accuracies[c] - per_class["fp32"][c]) for c in CLASS_NAMES]
        np.testing.assert_allclose(drawn, expected)
    low, high = ax.get_ylim()
    assert low < 0 < high  # zero, where FP32 is, is on the axes
    assert plots.per_class_delta_pp(per_class)[0] == list(CLASS_NAMES)


def test_per_class_plot_without_fp32_says_so():
    fig = plots.per_class_accuracy_figure({"ort-int8": dict.fromkeys(CLASS_NAMES, 0.5)})
    assert any("FP32" in t.get_text() for t in fig.axes[0].texts)


# ---- the comparison page -----------------------------------------------------------------------------------------
def _linked_rows() -> list[report.VariantRow]:
    return [replace(r, run_id=f"run{k:02d}" + "a" * 27) for k, r in enumerate(ROWS)]


def test_html_links_rows_to_their_runs_and_marks_best_and_champion():
    rows = _linked_rows()
    base = "http://tracking.example:5000/"
    champion = report.Champion("resnet8-int8", "3", rows[1].run_id)
    earlier = report.Champion("resnet8-int8-onnx", "1", "f" * 32)
    page = report.to_html(rows, "t", run_url=lambda run_id: f"{base}#/experiments/7/runs/{run_id}",
                          champions=[(champion, f"{base}#/experiments/7/runs/{rows[1].run_id}"),
                                     (earlier, f"{base}#/experiments/2/runs/{'f' * 32}")])
    for row in rows:
        assert re.search(rf'<a href="{re.escape(base)}#/experiments/7/runs/{row.run_id}"[^>]*>'
                         rf'{re.escape(row.variant)}</a>', page)
    best = report.best_variant(rows)
    assert best.variant == "pytorch-fx-int8"  # the highest agreement
    best_row = next(line for line in page.splitlines() if f"runs/{best.run_id}" in line and "<tr" in line)
    assert 'class="mark best"' in best_row and "best" in best_row.split('<tr class="')[1].split('"')[0]
    champion_row = next(line for line in page.splitlines() if f"runs/{champion.run_id}" in line and "<tr" in line)
    assert 'class="mark champion"' in champion_row and 'title="resnet8-int8 v3"' in champion_row
    assert sum('class="mark champion"' in line for line in page.splitlines() if "<tr" in line) == 1
    assert f'href="{base}#/experiments/2/runs/{"f" * 32}"' in page and "an earlier sweep" in page
    markdown = report.to_markdown(rows)
    assert "best variant: `pytorch-fx-int8`" in markdown


@pytest.mark.parametrize("uri, base", [
    ("http://alice:secret@tracking.example:5000", "http://tracking.example:5000/"),  # never the credentials
    ("https://tracking.example/mlflow/", "https://tracking.example/mlflow/"),
    ("sqlite:///tmp/mlflow.db", "http://127.0.0.1:5000/"),  # where `mlflow ui` serves a local store
])
def test_run_links_point_at_the_mlflow_ui(monkeypatch, uri, base):
    from ptqflow.pipelines.sweep.recording import run_url
    from ptqflow.tracking import connection

    monkeypatch.setattr(connection, "tracking_uri", lambda: uri)
    assert run_url("3", "abc123") == f"{base}#/experiments/3/runs/abc123"


def test_contended_timings_are_marked():
    rows = [variant_row("fp32", 0.7551, 316.2, None, latency_ms_b1_p50=0.4, speedup_b1_vs_fp32=1.0,
                        speedup_b256_vs_fp32=1.0, contended=False),
            variant_row("ort-int8", 0.7489, 94.2, 0.9447, latency_ms_b1_p50=128.0, speedup_b1_vs_fp32=0.003,
                        speedup_b256_vs_fp32=2.1, contended=True),
            variant_row("ort-uint8", 0.7472, 94.3, 0.9318, latency_ms_b1_p50=0.3, speedup_b1_vs_fp32=1.33,
                        speedup_b256_vs_fp32=2.0, contended=False)]
    mark = report.CONTENDED_MARK
    assert report.cell(rows[1], "latency_ms_b1_p50") == "128.000" + mark
    assert report.cell(rows[1], "speedup_b256_vs_fp32") == "2.10x" + mark
    assert report.cell(rows[1], "accuracy") == "74.89"
    assert mark not in "".join(report.cell(rows[2], f) for _, f in report.COLUMNS)
    markdown = report.to_markdown(rows)
    assert report.CONTENDED_NOTE in markdown and "| 128.000† | 0.00300x† | 2.10x† |" in markdown
    page = report.to_html(rows)
    assert page.count('class="num contended"') == 3 and html.escape(report.CONTENDED_NOTE) in page
    assert report.CONTENDED_NOTE not in report.to_markdown([rows[0], rows[2]])
    # When FP32's own timing was contended, every speedup is.
    busy_fp32 = [replace(rows[0], contended=True), rows[2]]
    assert report.cell(rows[2], "speedup_b1_vs_fp32", report.fp32_contended(busy_fp32)).endswith(mark)
    assert not report.cell(rows[2], "latency_ms_b1_p50", report.fp32_contended(busy_fp32)).endswith(mark)


CHROMIUM = Path(os.environ.get("PTQFLOW_CHROMIUM", "/usr/bin/chromium"))
LAPTOP_WIDTH = 1400


@pytest.mark.ui
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs headless Chromium at {CHROMIUM} (bash .ci/browser.sh)")
def test_html_fits_a_laptop_screen(tmp_path):
    """Rendered by headless Chromium in a 1,400 px window, the page (longest variant names, every mark, a long
    reason) is no wider than the window and the table needs no scrolling."""
    rows = _linked_rows() + [variant_row("ort-int8-u8s8", 0.7547, 94.0, 0.9844, latency_ms_b1_p50=128.123,
                                         speedup_b1_vs_fp32=0.00331, speedup_b256_vs_fp32=2.01, contended=True,
                                         run_id="b" * 32)]
    # The longest values a sweep writes.
    rows = [replace(r, backend="onnxruntime-cpu", calibration_method="percentile-observer",
                    weight_dtype="float32", activation_dtype="float32", compression_ratio=3.29)
            if k % 2 else r for k, r in enumerate(rows)]
    champion = report.Champion("resnet8-int8", "12", rows[2].run_id)
    page = report.to_html(rows, "resnet8.onnx on 10000 CIFAR-10 test images",
                          run_url=lambda r: f"http://127.0.0.1:5000/#/experiments/1/runs/{r}",
                          champions=[(champion, "http://127.0.0.1:5000/#/experiments/1/runs/x")])
    probe = ("<script>document.title = JSON.stringify({page: document.documentElement.scrollWidth, "
             "table: Math.ceil(document.querySelector('table').getBoundingClientRect().width), "
             "box: document.querySelector('div.table-box').clientWidth});</script>")
    path = tmp_path / "comparison.html"
    path.write_text(page.replace("</body>", probe + "</body>"))
    out = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--window-size={LAPTOP_WIDTH},900", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"<title>(\{.*?\})</title>", out.stdout)
    assert match, out.stderr[-2000:]
    import json

    widths = json.loads(match.group(1).replace("&quot;", '"'))
    assert widths["page"] <= LAPTOP_WIDTH, widths
    assert widths["table"] <= widths["box"], widths  # fits without scrolling inside its box
