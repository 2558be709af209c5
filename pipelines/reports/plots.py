"""PNG figures of a sweep for the MLflow UI: accuracy against size and latency, per-class accuracy,
agreement with FP32 and confusion matrices.

Every figure is a `matplotlib.figure.Figure` drawn by its own `FigureCanvasAgg`: no pyplot global state, so
figures can be rendered from any thread and without a display. Each plot has a `*_figure` function returning that
Figure (artists that matter carry a gid: "pareto-front", "marker:<variant>", "gate-limit", "delta:<variant>"), so
tests check what is drawn rather than pixels; the function without the suffix returns its PNG. matplotlib is
imported inside the functions because it takes a noticeable fraction of a second and most commands never draw
anything.
"""

from __future__ import annotations

import io

import numpy as np

from ptqflow.pipelines.reports.comparison import REUSED_MARK, VariantRow, is_reused
from ptqflow.pipelines.variants.specs import FP32

# 8 in x 100 dpi = 800 px: the width of the MLflow artifact preview, so nothing is scaled down.
DPI = 100
WIDTH_IN = 8.0
FONT_SIZE = 10
TITLE_SIZE = 12
QUANTIZED_COLOR = "tab:blue"
FP32_COLOR = "tab:gray"
FRONT_COLOR = "tab:red"
# Dark enough for the white value written inside the bar.
MEETS_TARGET_COLOR = "#2e7d32"
BELOW_TARGET_COLOR = "#c0540c"
# Markers whose centres are closer than this (inches; a marker is about 0.11 in wide) count as one spot and are
# spread on a ring of at least RING_MIN_IN around it.
COINCIDENT_IN = 0.14
RING_MIN_IN = 0.1
STEM_MARKERS = ("o", "s", "D", "^", "v", "P", "X")
CONTENDED_LABEL = "(timed while busy)"
LABEL_GAP = 0.07  # axes fraction between a marker and its label
MARKER_CLEARANCE_IN = 0.08  # half the side of the square around a marker that labels keep clear of
EPS = 1e-9
LOG_LATENCY_ABOVE = 5.0  # the latency axis turns logarithmic when the slowest variant is this many times the fastest
# Datasets with many classes (CIFAR-100): the per-class plot shows the classes that changed most, the confusion
# matrix drops the per-cell counts and grows with the class count so that every class keeps a readable label.
PER_CLASS_SHOWN = 20
CONFUSION_COUNTS_UP_TO = 20  # classes; beyond, cells show colour only
CONFUSION_CELL_IN = 0.13  # inches per class of a large confusion matrix
CONFUSION_MAX_IN = 16.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (smaller or equal x and larger or equal y, one strictly),
    ordered by increasing x."""
    def dominated(i: int) -> bool:
        xi, yi = points[i]
        return any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for xj, yj in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -points[i][1]))


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] over all images."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_vs_size(rows: list[VariantRow]) -> bytes:
    return _png(accuracy_vs_size_figure(rows))


def accuracy_vs_size_figure(rows: list[VariantRow]):
    shown = [r for r in rows if r.status == "ok" and r.accuracy is not None and r.model_size_bytes is not None]
    fig, ax = _figure(5.5, "Top-1 accuracy vs model size", "model size (KiB)", "top-1 accuracy (%)")
    if not shown:
        _note(ax, "no evaluated variant")
        return fig
    _scatter_with_front(ax, [(r.model_size_bytes / 1024, 100 * r.accuracy) for r in shown], [_name(r) for r in shown])
    return fig


def accuracy_vs_latency(rows: list[VariantRow], latency_ms: dict[str, float],
                        contended: frozenset[str] | set[str] = frozenset()) -> bytes:
    return _png(accuracy_vs_latency_figure(rows, latency_ms, contended))


def accuracy_vs_latency_figure(rows: list[VariantRow], latency_ms: dict[str, float],
                               contended: frozenset[str] | set[str] = frozenset()):
    """latency_ms: variant -> batch-1 p50 latency; contended: variants whose timing was contended (their label
    says so)."""
    shown = [r for r in rows if r.status == "ok" and r.accuracy is not None and r.variant in latency_ms]
    fig, ax = _figure(5.5, "Top-1 accuracy vs batch-1 latency (p50)", "batch-1 latency, p50 (ms)",
                      "top-1 accuracy (%)")
    if not shown:
        _note(ax, "no latency measured (run without --no-bench)")
        return fig
    names = [_name(r) + (f" {CONTENDED_LABEL}" if r.variant in contended else "") for r in shown]
    _scatter_with_front(ax, [(latency_ms[r.variant], 100 * r.accuracy) for r in shown], names,
                        is_fp32=[r.variant == FP32 for r in shown], log_x_above=LOG_LATENCY_ABOVE)
    return fig


def per_class_accuracy(per_class: dict[str, dict[str, float]]) -> bytes:
    return _png(per_class_accuracy_figure(per_class))


def per_class_delta_pp(per_class: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(class names, variant -> per-class accuracy minus FP32's, in percentage points) for every variant but FP32."""
    reference = per_class.get(FP32, {})
    class_names = list(reference)
    deltas = {variant: np.array([100 * (accuracies.get(c, np.nan) - reference[c]) for c in class_names])
              for variant, accuracies in per_class.items() if variant != FP32}
    return class_names, deltas


def most_changed_classes(deltas: dict[str, np.ndarray], count: int) -> np.ndarray:
    """Indices (ascending) of the `count` classes whose largest change over the variants is largest."""
    change = np.nan_to_num(np.nanmax(np.abs(np.vstack(list(deltas.values()))), axis=0), nan=-1.0) \
        if deltas else np.zeros(0)
    return np.sort(np.argsort(-change, kind="stable")[:count])


def per_class_accuracy_figure(per_class: dict[str, dict[str, float]]):
    """Per class, each quantized variant's accuracy minus FP32's (pp), as stems from zero: per_class maps variant ->
    {class name -> accuracy in 0..1} and includes FP32. Differences of a point or two stay readable, and variants
    that differ only in a few classes can be told apart. With more than PER_CLASS_SHOWN classes, only the classes
    that changed most are drawn (the title says how many of how many)."""
    fig, ax = _figure(5.5, "Per-class top-1 accuracy: difference from FP32", "class (FP32 top-1 accuracy)",
                      "accuracy − FP32 accuracy (pp)")
    class_names, deltas = per_class_delta_pp(per_class)
    if not class_names or not deltas:
        _note(ax, "no FP32 reference" if not class_names else "no quantized variant evaluated")
        return fig
    if len(class_names) > PER_CLASS_SHOWN:
        keep = most_changed_classes(deltas, PER_CLASS_SHOWN)
        ax.set_title(f"Per-class top-1 accuracy vs FP32: the {PER_CLASS_SHOWN} of {len(class_names)} classes that "
                     "changed most", fontsize=TITLE_SIZE)
        class_names = [class_names[i] for i in keep]
        deltas = {variant: values[keep] for variant, values in deltas.items()}
    positions = np.arange(len(class_names))
    width = 0.8 / len(deltas)
    ax.axhline(0, color="black", linewidth=0.9, zorder=1)
    for k, (variant, values) in enumerate(deltas.items()):
        x = positions + (k - (len(deltas) - 1) / 2) * width
        color = f"C{k % 10}"
        ax.vlines(x, 0, values, color=color, linewidth=2.2, zorder=2)
        ax.plot(x, values, linestyle="none", marker=STEM_MARKERS[k % len(STEM_MARKERS)], markersize=6, color=color,
                label=variant, gid=f"delta:{variant}", zorder=3)
    reference = per_class[FP32]
    if len(class_names) <= 10:
        ax.set_xticks(positions, [f"{c}\n{100 * reference[c]:.1f}%" for c in class_names], fontsize=FONT_SIZE)
    else:  # one slanted line per class keeps 11 to PER_CLASS_SHOWN names apart
        ax.set_xticks(positions, [f"{c} ({100 * reference[c]:.0f}%)" for c in class_names], fontsize=FONT_SIZE - 2,
                      rotation=45, ha="right", rotation_mode="anchor")
    for boundary in positions[:-1] + 0.5:  # one band per class, so each group reads as a unit
        ax.axvline(boundary, color="0.85", linewidth=0.8, zorder=0)
    largest = np.nanmax(np.abs(np.concatenate(list(deltas.values())))) if deltas else 0.0
    limit = max(1.0, 1.15 * (largest if np.isfinite(largest) else 0.0))
    ax.set_ylim(-limit, limit)
    ax.set_xlim(-0.5, len(class_names) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(fontsize=FONT_SIZE, loc="outside lower center", ncol=min(len(deltas), 3))
    return fig


def agreement(rows: list[VariantRow], min_agreement: float) -> bytes:
    return _png(agreement_figure(rows, min_agreement))


def agreement_figure(rows: list[VariantRow], min_agreement: float):
    """Horizontal bars of top-1 agreement with FP32 per quantized variant, against the promotion gate's limit
    (GatePolicy.min_agreement, a share in 0..1)."""
    from matplotlib.patches import Patch

    shown = [r for r in rows if r.variant != FP32 and r.top1_agreement is not None]
    fig, ax = _figure(max(3.0, 1.6 + 0.45 * len(shown)), "Top-1 agreement with FP32",
                      "images with the same top-1 class as FP32 (%)")
    if not shown:
        _note(ax, "no quantized variant evaluated")
        return fig
    limit = 100 * min_agreement
    values = [100 * r.top1_agreement for r in shown]
    colors = [MEETS_TARGET_COLOR if v >= limit else BELOW_TARGET_COLOR for v in values]
    bars = ax.barh([_name(r) for r in shown], values, color=colors, height=0.6)
    ax.invert_yaxis()  # first row on top, as in the comparison table
    ax.tick_params(axis="y", labelsize=FONT_SIZE)
    limit_line = ax.axvline(limit, color="black", linestyle="--", linewidth=1.2, gid="gate-limit",
                            label=f"promotion gate: agreement ≥ {round(limit, 4):g}%")
    # Agreement of a usable variant sits in the nineties: zoom so the bars can be told apart.
    low = min(min(values), limit)
    ax.set_xlim(max(0.0, 5 * np.floor((low - 5) / 5)), 100.0)
    for bar, value, color in zip(bars, values, colors):
        # Inside the bar's end, so a value near 100% is not pushed past the axes; on the bar's colour, so the limit
        # line does not run through the digits.
        ax.text(value - 0.15, bar.get_y() + bar.get_height() / 2, f"{value:.2f}%", ha="right", va="center",
                color="white", fontsize=FONT_SIZE, fontweight="bold", zorder=4,
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1})
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    # Below the axes: inside, any corner would hide a bar or the limit line.
    swatches = [Patch(color=color, label=label) for color, label in
                ((MEETS_TARGET_COLOR, "passes the gate's limit"), (BELOW_TARGET_COLOR, "below the gate's limit"))
                if color in colors]
    fig.legend(handles=[limit_line, *swatches], fontsize=FONT_SIZE, loc="outside lower center", ncol=3)
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...], title: str) -> bytes:
    """Counts of (true, predicted) class as a heat map, each cell's count written in it for up to
    CONFUSION_COUNTS_UP_TO classes; more classes get a larger figure, small labels and colour only."""
    k = len(class_names)
    counts = confusion_counts(labels, predictions, k)
    fig, ax = _figure(7.5, title, "predicted class", "true class")
    label_size = FONT_SIZE
    if k > CONFUSION_COUNTS_UP_TO:
        side = min(CONFUSION_MAX_IN, max(WIDTH_IN, CONFUSION_CELL_IN * k + 2.5))
        fig.set_size_inches(side, side)
        label_size = max(4, min(FONT_SIZE - 2, int(72 * (side - 2.5) / k * 0.75)))
    if k > CONFUSION_COUNTS_UP_TO:  # a square-root scale, so a few confusions still show beside a full diagonal
        from matplotlib.colors import PowerNorm

        image = ax.imshow(counts, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=max(1, int(counts.max()))))
    else:
        image = ax.imshow(counts, cmap="Blues", vmin=0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("images", fontsize=FONT_SIZE)
    ticks = np.arange(k)
    ax.set_xticks(ticks, class_names, rotation=45 if k <= CONFUSION_COUNTS_UP_TO else 90,
                  ha="right" if k <= CONFUSION_COUNTS_UP_TO else "center", fontsize=label_size)
    ax.set_yticks(ticks, class_names, fontsize=label_size)
    if k > CONFUSION_COUNTS_UP_TO:
        return _png(fig)
    dark = counts.max() / 2
    for true_class in range(len(class_names)):
        for predicted in range(len(class_names)):
            count = counts[true_class, predicted]
            ax.text(predicted, true_class, str(count), ha="center", va="center", fontsize=FONT_SIZE,
                    color="white" if count > dark else "black")
    return _png(fig)


def _figure(height_in: float, title: str, xlabel: str, ylabel: str | None = None):
    """A figure with one titled, labelled axes; every plot's text uses the same sizes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # fig.canvas.draw() lays it out, as saving the PNG does
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    return fig, ax


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = io.BytesIO()
    FigureCanvasAgg(fig).print_png(out)
    return out.getvalue()


def _note(ax, text: str) -> None:
    """A message instead of data; the ticks go, since with nothing plotted their values mean nothing."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=FONT_SIZE + 1, color="dimgray")


def _name(row: VariantRow) -> str:
    """A variant's label: its name, marked when the row is an earlier sweep's run reused by --resume."""
    return f"{row.variant} {REUSED_MARK} reused" if is_reused(row) else row.variant


def _scatter_with_front(ax, points: list[tuple[float, float]], names: list[str],
                        is_fp32: list[bool] | None = None, log_x_above: float | None = None) -> None:
    """Accuracy (y, higher is better) against a cost (x, lower is better): one marker per variant (FP32 a star),
    its name beside it, and the Pareto front as the staircase bounding the region it dominates (shaded, lower
    right). Variants at (nearly) the same point are drawn around it on a small ring, joined to it, so none hides
    another; each label's leader line goes to its own marker. log_x_above: a logarithmic x axis when the largest x
    is more than this many times the smallest (one slow outlier would squeeze every other variant into a line)."""
    from matplotlib.transforms import ScaledTranslation

    is_fp32 = is_fp32 if is_fp32 is not None else [name == FP32 for name in names]
    xs = [x for x, _ in points]
    if log_x_above is not None and min(xs) > 0 and max(xs) > log_x_above * min(xs):
        ax.set_xscale("log")
        ax.set_xlabel(ax.get_xlabel() + ", log scale")
    ax.update_datalim(points)
    ax.margins(x=0.25, y=0.2)
    ax.autoscale_view()
    ax.set_xlim(*ax.get_xlim())  # fixed from here on: the front runs to the edges, markers are offset in inches
    ax.set_ylim(*ax.get_ylim())
    ax.grid(alpha=0.3)
    front = pareto_front(points)
    _draw_front(ax, [points[i] for i in front])
    offsets = marker_offsets(ax, points)
    transforms = [ax.transData + ScaledTranslation(dx, dy, ax.figure.dpi_scale_trans) for dx, dy in offsets]
    legend_done: set[str] = set()

    def label_once(label: str) -> str:
        if label in legend_done:
            return "_nolegend_"
        legend_done.add(label)
        return label

    for i, ((x, y), name, fp32, (dx, dy)) in enumerate(zip(points, names, is_fp32, offsets)):
        if (dx, dy) != (0.0, 0.0):  # the true position, joined to the displaced marker
            ax.plot([x], [y], linestyle="none", marker="o", markersize=3, color="black", zorder=5)
            ax.annotate("", xy=(x, y), xytext=(72 * dx, 72 * dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.35", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
        ax.plot([x], [y], linestyle="none", marker="*" if fp32 else "o", markersize=14 if fp32 else 8,
                color=FP32_COLOR if fp32 else QUANTIZED_COLOR, markeredgecolor="white", markeredgewidth=0.6,
                transform=transforms[i], gid=f"marker:{name}", label=label_once("FP32" if fp32 else "quantized"),
                zorder=4)
        if i in front:
            ax.plot([x], [y], linestyle="none", marker="o", markersize=16, markerfacecolor="none",
                    markeredgecolor=FRONT_COLOR, markeredgewidth=1.6, transform=transforms[i],
                    label=label_once("on the Pareto front"), zorder=3)
    _label_points(ax, points, names, offsets, transforms)
    # Below the axes: inside, any corner can hide a variant.
    ax.figure.legend(fontsize=FONT_SIZE, loc="outside lower center", ncol=4)


def _draw_front(ax, front_points: list[tuple[float, float]]) -> None:
    """The staircase from the bottom edge up to the cheapest front point, across and up through each next one, to
    the right edge; everything right of and below it is dominated (lightly shaded). Visible even when one point
    dominates all the others."""
    if not front_points:
        return
    (x_low, x_high), (y_low, _) = ax.get_xlim(), ax.get_ylim()
    xs, ys = [front_points[0][0]], [y_low]
    for k, (x, y) in enumerate(front_points):
        if k:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    xs.append(x_high)
    ys.append(ys[-1])
    ax.plot(xs, ys, color=FRONT_COLOR, linewidth=1.5, alpha=0.8, label="Pareto front", gid="pareto-front", zorder=2)
    ax.fill_between(xs, ys, y_low, color=FRONT_COLOR, alpha=0.06, linewidth=0, zorder=0)
    ax.set_xlim(x_low, x_high)


def marker_offsets(ax, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(dx, dy) in inches for each point's marker: (0, 0) unless other points lie within COINCIDENT_IN of it on
    the axes; then every point of that group sits on a ring around the group's centre, far enough apart that no
    marker covers another. Uses the axes' current limits and size."""
    width_in, height_in = _axes_inches(ax)
    inches = [(fx * width_in, fy * height_in) for fx, fy in _fractions(ax, points)]
    group = list(range(len(points)))  # union-find over points closer than COINCIDENT_IN

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(points)):
        for j in range(i):
            if np.hypot(inches[i][0] - inches[j][0], inches[i][1] - inches[j][1]) < COINCIDENT_IN:
                group[root(i)] = root(j)
    offsets = [(0.0, 0.0)] * len(points)
    for r in {root(i) for i in range(len(points))}:
        members = [i for i in range(len(points)) if root(i) == r]
        if len(members) < 2:
            continue
        cx = sum(inches[i][0] for i in members) / len(members)
        cy = sum(inches[i][1] for i in members) / len(members)
        # Neighbours on the ring are 2 r sin(pi/k) apart: at least one marker's width plus a gap.
        radius = max(RING_MIN_IN, COINCIDENT_IN / (2 * np.sin(np.pi / len(members))))
        members.sort(key=lambda i: (inches[i][0], -inches[i][1]))  # leftmost (then highest) first
        # Two side by side, keeping their accuracy readable on the y axis; more around the ring from the left.
        start = np.pi
        for k, i in enumerate(members):
            angle = start - 2 * np.pi * k / len(members)
            offsets[i] = (float(cx + radius * np.cos(angle) - inches[i][0]),
                          float(cy + radius * np.sin(angle) - inches[i][1]))
    return offsets


def _label_points(ax, points: list[tuple[float, float]], names: list[str], offsets: list[tuple[float, float]],
                  transforms: list) -> None:
    """Names beside their (possibly offset) markers, with leader lines, placed so no two labels overlap (quantized
    variants often share size and accuracy almost exactly): each label goes half a line above its marker (the
    front's horizontal segments run through the markers), or the nearest free line above, then below."""
    from matplotlib.font_manager import FontProperties

    width_in, height_in = _axes_inches(ax)
    line_gap = 1.5 * FONT_SIZE / 72 / height_in  # one text line, in axes fractions
    fractions = [(fx + dx / width_in, fy + dy / height_in)
                 for (fx, fy), (dx, dy) in zip(_fractions(ax, points), offsets)]
    renderer = ax.figure.canvas.get_renderer()
    font = FontProperties(size=FONT_SIZE)
    widths = [(renderer.get_text_width_height_descent(name, font, ismath=False)[0] / ax.figure.dpi + 0.1) / width_in
              for name in names]
    # Points left of 60% get their label on the right, the others on the left, so labels stay inside the axes;
    # markers moved apart around a shared spot take the side they were moved to, so leader lines never cross them.
    right = [dx > 0 if dx else fx < 0.6 for (fx, _), (dx, _) in zip(fractions, offsets)]
    # (left, right, bottom, top) in axes fractions of what a label must not cover: the markers, then the labels
    half_w, half_h = MARKER_CLEARANCE_IN / width_in, MARKER_CLEARANCE_IN / height_in
    placed = [(fx - half_w, fx + half_w, fy - half_h, fy + half_h) for fx, fy in fractions]
    for i in sorted(range(len(points)), key=lambda i: (fractions[i][1], fractions[i][0])):
        fx = fractions[i][0] + (LABEL_GAP if right[i] else -LABEL_GAP)
        left_edge, right_edge = (fx, fx + widths[i]) if right[i] else (fx - widths[i], fx)
        base = fractions[i][1] + 0.5 * line_gap
        for k in [*range(0, 13), *range(-1, -13, -1)]:
            fy = base + k * line_gap
            box = (left_edge, right_edge, fy - line_gap / 2, fy + line_gap / 2)
            inside = 0.0 <= box[2] and box[3] <= 1.0
            if inside and not any(box[0] < b[1] - EPS and b[0] < box[1] - EPS and box[2] < b[3] - EPS
                                  and b[2] < box[3] - EPS for b in placed):
                break
        else:
            fy, box = base, (left_edge, right_edge, base - line_gap / 2, base + line_gap / 2)
        placed.append(box)
        ax.annotate(names[i], xy=points[i], xycoords=transforms[i], xytext=(fx, fy), textcoords="axes fraction",
                    fontsize=FONT_SIZE, ha="left" if right[i] else "right", va="center",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
                    arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.8, "shrinkB": 6},
                    gid=f"label:{names[i]}", zorder=6)


def _axes_inches(ax) -> tuple[float, float]:
    bbox = ax.get_position()
    return bbox.width * ax.figure.get_figwidth(), bbox.height * ax.figure.get_figheight()


def _fractions(ax, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Data points as fractions of the axes (0..1 inside), on whatever scale the axes has (linear or log)."""
    to_axes = ax.transScale + ax.transLimits
    return [tuple(map(float, to_axes.transform(point))) for point in points]


def tune_pareto(trials: list[tuple[float, float, str]], front: list[tuple[float, float]],
                best: tuple[float, float] | None, target_agreement: float, min_speedup: float, title: str) -> bytes:
    return _png(tune_pareto_figure(trials, front, best, target_agreement, min_speedup, title))


def tune_pareto_figure(trials: list[tuple[float, float, str]], front: list[tuple[float, float]],
                       best: tuple[float, float] | None, target_agreement: float, min_speedup: float, title: str):
    """A tune study: every complete trial (speed vs ORT FP32 at batch 256, agreement %), coloured by format; the
    Pareto front as a line (gid "pareto-front"); the targets as dashed lines (gid "target"); the best feasible trial
    as a star (gid "best")."""
    fig, ax = _figure(5.0, title, "batch-256 throughput vs ORT FP32 (same process)", "top-1 agreement with FP32 (%)")
    if not trials:
        _note(ax, "no complete trial yet")
        return fig
    formats = sorted({f for _, _, f in trials})
    colors = {f: c for f, c in zip(formats, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown",
                                            "tab:pink", "tab:olive", "tab:cyan"))}
    for fmt in formats:
        xs = [x for x, _, f in trials if f == fmt]
        ys = [100 * y for _, y, f in trials if f == fmt]
        ax.scatter(xs, ys, s=28, color=colors.get(fmt, QUANTIZED_COLOR), alpha=0.8, label=fmt, zorder=3)
    if front:
        pts = sorted(front)
        # rings on the front's trials (a front of one trial is a ring), joined by the line no trial crosses
        line, = ax.plot([x for x, _ in pts], [100 * y for _, y in pts], color=FRONT_COLOR, lw=1.2, zorder=2,
                        marker="o", markersize=11, markerfacecolor="none", markeredgewidth=1.5,
                        label="Pareto front", drawstyle="steps-post" if len(pts) > 1 else "default")
        line.set_gid("pareto-front")
    ax.axhline(100 * target_agreement, color="dimgray", ls="--", lw=1, zorder=1).set_gid("target")
    ax.axvline(min_speedup, color="dimgray", ls="--", lw=1, zorder=1).set_gid("target")
    if best is not None:
        ax.scatter([best[0]], [100 * best[1]], marker="*", s=220, color=MEETS_TARGET_COLOR, zorder=4,
                   label="best feasible").set_gid("best")
    ys = [100 * y for _, y, _ in trials] + [100 * target_agreement]
    low = min(ys)
    ax.set_ylim(max(min(low - 0.3 * (100 - low), 99.0), 0), 100.05)  # at least a point of range, no offset
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.legend(fontsize=FONT_SIZE - 1, loc="lower left")
    ax.grid(alpha=0.3)
    return fig
