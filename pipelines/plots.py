"""PNG figures of a sweep for the MLflow UI: accuracy against size and latency, per-class accuracy,
agreement with FP32 and confusion matrices.

Every figure is a `matplotlib.figure.Figure` drawn by its own `FigureCanvasAgg`: no pyplot global state, so
figures can be rendered from any thread and without a display. matplotlib is imported inside the functions
because it takes a noticeable fraction of a second and most commands never draw anything.
"""

from __future__ import annotations

import io

import numpy as np

from pipelines.report import VariantRow
from pipelines.variants import FP32

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
    shown = [r for r in rows if r.status == "ok" and r.accuracy is not None and r.model_size_bytes is not None]
    fig, ax = _figure(5.5, "Top-1 accuracy vs model size", "model size (KiB)", "top-1 accuracy (%)")
    if not shown:
        _note(ax, "no evaluated variant")
        return _png(fig)
    points = [(r.model_size_bytes / 1024, 100 * r.accuracy) for r in shown]
    front = pareto_front(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color=FRONT_COLOR,
            linewidth=1.5, alpha=0.7, label="Pareto front", zorder=1)
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=220, facecolors="none",
               edgecolors=FRONT_COLOR, linewidths=1.8, label="on the front", zorder=3)
    _scatter_variants(ax, points, [r.variant for r in shown])
    ax.legend(fontsize=FONT_SIZE, loc="lower right")
    return _png(fig)


def accuracy_vs_latency(rows: list[VariantRow], latency_ms: dict[str, float]) -> bytes:
    shown = [r for r in rows if r.status == "ok" and r.accuracy is not None and r.variant in latency_ms]
    fig, ax = _figure(5.5, "Top-1 accuracy vs batch-1 latency", "batch-1 latency (ms)", "top-1 accuracy (%)")
    if not shown:
        _note(ax, "no latency measured (run without --no-bench)")
        return _png(fig)
    _scatter_variants(ax, [(latency_ms[r.variant], 100 * r.accuracy) for r in shown], [r.variant for r in shown])
    ax.legend(fontsize=FONT_SIZE, loc="lower right")
    return _png(fig)


def per_class_accuracy(per_class: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: per_class maps variant -> {class name -> accuracy in 0..1}."""
    variants = list(per_class)
    class_names = list(per_class[variants[0]]) if variants else []
    fig, ax = _figure(5.5, "Per-class top-1 accuracy", "class", "top-1 accuracy (%)")
    if not variants:
        _note(ax, "no per-class accuracy")
        return _png(fig)
    values = np.array([[100 * per_class[v].get(c, np.nan) for c in class_names] for v in variants])
    positions = np.arange(len(class_names))
    bar_width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        color = FP32_COLOR if variant == FP32 else None
        ax.bar(positions + (k - (len(variants) - 1) / 2) * bar_width, values[k], width=bar_width, label=variant,
               color=color)
    ax.set_xticks(positions, class_names, rotation=30, ha="right", fontsize=FONT_SIZE)
    # Quantized variants differ by a few points at most: a 0-based axis would make every group look the same.
    low, high = np.nanmin(values), np.nanmax(values)
    ax.set_ylim(max(0.0, 10 * np.floor((low - 5) / 10)), min(100.0, high + 3))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(fontsize=FONT_SIZE, loc="outside lower center", ncol=min(len(variants), 3))
    return _png(fig)


def agreement(rows: list[VariantRow], target: float = 0.975) -> bytes:
    """Horizontal bars of top-1 agreement with FP32 per quantized variant, against a target agreement."""
    from matplotlib.patches import Patch

    shown = [r for r in rows if r.variant != FP32 and r.top1_agreement is not None]
    fig, ax = _figure(max(3.0, 1.6 + 0.45 * len(shown)), "Top-1 agreement with FP32",
                      "images with the same top-1 class as FP32 (%)")
    if not shown:
        _note(ax, "no quantized variant evaluated")
        return _png(fig)
    values = [100 * r.top1_agreement for r in shown]
    colors = [MEETS_TARGET_COLOR if v >= 100 * target else BELOW_TARGET_COLOR for v in values]
    bars = ax.barh([r.variant for r in shown], values, color=colors, height=0.6)
    ax.invert_yaxis()  # first row on top, as in the comparison table
    ax.tick_params(axis="y", labelsize=FONT_SIZE)
    target_line = ax.axvline(100 * target, color="black", linestyle="--", linewidth=1.2,
                             label=f"target {100 * target:.1f}%")
    # Agreement of a usable variant sits in the nineties: zoom so the bars can be told apart.
    low = min(min(values), 100 * target)
    ax.set_xlim(max(0.0, 5 * np.floor((low - 5) / 5)), 100.0)
    for bar, value in zip(bars, values):
        # Inside the bar's end, so a value near 100% is not pushed past the axes.
        ax.text(value - 0.15, bar.get_y() + bar.get_height() / 2, f"{value:.2f}%", ha="right", va="center",
                color="white", fontsize=FONT_SIZE, fontweight="bold")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    # Below the axes: inside, any corner would hide a bar or the target line.
    swatches = [Patch(color=color, label=label) for color, label in
                ((MEETS_TARGET_COLOR, "meets target"), (BELOW_TARGET_COLOR, "below target")) if color in colors]
    fig.legend(handles=[target_line, *swatches], fontsize=FONT_SIZE, loc="outside lower center", ncol=3)
    return _png(fig)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...], title: str) -> bytes:
    counts = confusion_counts(labels, predictions, len(class_names))
    fig, ax = _figure(7.5, title, "predicted class", "true class")
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("images", fontsize=FONT_SIZE)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=FONT_SIZE)
    ax.set_yticks(ticks, class_names, fontsize=FONT_SIZE)
    dark = counts.max() / 2
    for true_class in range(len(class_names)):
        for predicted in range(len(class_names)):
            count = counts[true_class, predicted]
            ax.text(predicted, true_class, str(count), ha="center", va="center", fontsize=FONT_SIZE,
                    color="white" if count > dark else "black")
    return _png(fig)


def _figure(height_in: float, title: str, xlabel: str, ylabel: str | None = None):
    """A figure with one titled, labelled axes; every plot's text uses the same sizes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
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


def _scatter_variants(ax, points: list[tuple[float, float]], names: list[str]) -> None:
    """One marker per variant (FP32 as a star) and its name beside it, stacked so close points stay legible."""
    for marker, color, label, is_fp32 in (("o", QUANTIZED_COLOR, "quantized", False), ("*", FP32_COLOR, "FP32", True)):
        chosen = [p for p, name in zip(points, names) if (name == FP32) == is_fp32]
        if chosen:
            ax.scatter(*zip(*chosen), marker=marker, s=160 if is_fp32 else 60, color=color, label=label, zorder=4)
    ax.margins(x=0.25, y=0.2)
    ax.grid(alpha=0.3)
    _label_points(ax, points, names)


def _label_points(ax, points: list[tuple[float, float]], names: list[str]) -> None:
    """Names beside their points, with leader lines; labels on one side are spread vertically so they never
    overlap, which matters because quantized variants often share size and accuracy almost exactly."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    axes_height_px = ax.get_position().height * ax.figure.get_figheight() * DPI
    line_gap = 1.5 * FONT_SIZE / 72 * DPI / axes_height_px  # one text line, in axes fractions
    fractions = [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in points]
    for on_right in (True, False):
        # Points left of 60% get their label on the right, the others on the left, so labels stay inside the axes.
        side = sorted((i for i, (fx, _) in enumerate(fractions) if (fx < 0.6) == on_right),
                      key=lambda i: fractions[i][1])
        label_y = _spread([fractions[i][1] for i in side], line_gap)
        for i, fy in zip(side, label_y):
            fx = fractions[i][0] + (0.06 if on_right else -0.06)
            ax.annotate(names[i], xy=points[i], xytext=(fx, fy), textcoords="axes fraction", fontsize=FONT_SIZE,
                        ha="left" if on_right else "right", va="center",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
                        arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.8, "shrinkB": 5})


def _spread(sorted_positions: list[float], gap: float, low: float = 0.03, high: float = 0.97) -> list[float]:
    """Positions as close as possible to the given (ascending) ones, at least `gap` apart, within [low, high]
    unless there are too many to fit."""
    spread: list[float] = []
    for position in sorted_positions:  # push up past the previous label...
        spread.append(max(position, low, spread[-1] + gap) if spread else max(position, low))
    for i in reversed(range(len(spread))):  # ...then down from the top edge
        spread[i] = min(spread[i], high if i == len(spread) - 1 else spread[i + 1] - gap)
    return spread
