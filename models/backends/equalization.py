"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.1) of Conv -> activation -> Conv pairs on the FP32 ONNX graph (which pairs, and what each
activation allows: equalization_pairs.py).

Dividing output channel i of the first convolution (weights and bias) by s_i and multiplying input channel i of the
second by s_i leaves the model's function unchanged through a positively homogeneous activation. With
s_i = sqrt(r1_i / r2_i), where r1_i is the largest |weight| of the first convolution's output channel i and r2_i that
of the second convolution's input channel i, both ranges become sqrt(r1_i * r2_i): a channel whose weights (and so
whose activations) were far larger than the others' no longer sets the whole tensor's quantization range. A
depthwise convolution's filter i is both its input and its output channel i, so MobileNet's pointwise -> depthwise
-> pointwise chains are two pairs sharing it; pairs are equalized in turn, several times over, until the scales
settle.

Through Clip(0, b) (ReLU6) a scale is exact only where the clip does nothing, so `equalize` takes each bounded
pair's per-channel maxima on calibration images (`clip_maxima`): a channel that reaches b / HEADROOM there keeps
scale 1, and any other channel's total scale stays at least HEADROOM * max / b, so what the calibration images
reach stays below half the bound before and after. Without maxima, bounded pairs are skipped with that reason.

onnxruntime.quantization ships no equalization (its only pre-quantization transform of this kind is SmoothQuant,
which needs neural-compressor and targets MatMul activations, not Conv -> Relu -> Conv), so it is written here.

Every function takes an `onnx.ModelProto` and returns a new one; the input is never modified. Initializers keep
their names (they are rewritten in place when nothing else reads them), so weight-by-name tools such as
onnxruntime's `create_weight_matching` still pair them with the quantized model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ptqflow.models.backends.equalization_pairs import Pair, conv_kind, equalizable_pairs

__all__ = ["EqualizationSummary", "equalize", "equalize_file", "equalizable_pairs", "clip_maxima",
           "DEFAULT_ITERATIONS", "HEADROOM"]

DEFAULT_ITERATIONS = 20  # passes over all pairs; chains of two or three pairs settle within a few
_SCALE_LIMITS = (1e-6, 1e6)  # a dead channel (all-zero weights on one side) keeps scale 1 instead of 0 or inf
HEADROOM = 2.0  # through Clip(0, b): what calibration images reach stays below b / HEADROOM, before and after
MAXIMA_IMAGES = 256  # calibration images the per-channel maxima of bounded pairs are taken on


@dataclass(frozen=True)
class EqualizationSummary:
    """What `equalize` did: the (first Conv, second Conv) node-name pairs it equalized, the candidates it left alone
    with the reason, how many channels a Clip's bound held at scale 1, and the largest and smallest per-channel
    scale it applied in total."""

    pairs: tuple[tuple[str, str], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (node name, reason)
    iterations: int = 0
    max_scale: float = 1.0
    min_scale: float = 1.0
    channels_held: int = 0  # channels of bounded pairs whose calibration maximum reaches b / HEADROOM
    scales: dict = field(default_factory=dict, repr=False, compare=False)  # (conv1, conv2) -> per-channel scales

    def to_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "skipped": [list(s) for s in self.skipped],
                "iterations": self.iterations, "max_scale": self.max_scale, "min_scale": self.min_scale,
                "channels_held": self.channels_held}


def bounded_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose per-channel maxima `equalize` needs: each Clip(0, b) pair's first convolution output."""
    return [pair.bounded_tensor for pair in equalizable_pairs(model)[0] if pair.bound is not None]


def clip_maxima(model: onnx.ModelProto, calibration: np.ndarray, images: int = MAXIMA_IMAGES
                ) -> dict[str, np.ndarray]:
    """Per-channel maxima (over images and positions) of `bounded_tensors(model)` on the first `images` model-ready
    calibration images, run in onnxruntime with those tensors as extra outputs. {} when there are none."""
    from ptqflow.models.runtime.runners import OrtRunner

    names = bounded_tensors(model)
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    runner = OrtRunner(probe.SerializeToString())
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 64  # a fixed batch (1) is kept
    maxima = {name: None for name in names}
    for start in range(0, min(images, len(calibration)), batch):
        outputs = runner.session.run(names, {runner.input_name: calibration[start:start + batch]})
        for name, value in zip(names, outputs):
            channel = value.max(axis=(0, *range(2, value.ndim)))
            maxima[name] = channel if maxima[name] is None else np.maximum(maxima[name], channel)
    return maxima


def _ranges(weights: np.ndarray, kind: str, side: str) -> np.ndarray:
    """Per-channel largest |weight|: the first convolution's output channels, or the second's input channels (a
    depthwise convolution's filters in both cases)."""
    if side == "second" and kind == "plain":
        weights = weights.swapaxes(0, 1)
    return np.abs(weights).reshape(weights.shape[0], -1).max(axis=1)


def _scaled(weights: np.ndarray, kind: str, side: str, scale: np.ndarray) -> np.ndarray:
    """The first convolution's output channels divided by `scale`, or the second's input channels multiplied."""
    axis = 1 if (side == "second" and kind == "plain") else 0
    shape = [1] * weights.ndim
    shape[axis] = -1
    return weights / scale.reshape(shape) if side == "first" else weights * scale.reshape(shape)


def _limits(pair: Pair, maxima: dict, channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(lowest, highest) total scale per channel and how many channels are held at 1 (module docstring)."""
    low, high = np.full(channels, _SCALE_LIMITS[0]), np.full(channels, _SCALE_LIMITS[1])
    if pair.bound is None:
        return low, high, 0
    reached = np.asarray(maxima[pair.bounded_tensor], dtype=np.float64)
    held = reached * HEADROOM >= pair.bound
    low[held], high[held] = 1.0, 1.0
    low[~held] = np.maximum(low[~held], reached[~held] * HEADROOM / pair.bound)
    return low, high, int(held.sum())


def equalize(model: onnx.ModelProto, iterations: int = DEFAULT_ITERATIONS, tolerance: float = 1e-4,
             maxima: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, EqualizationSummary]:
    """A copy of `model` with every equalizable pair (equalization_pairs.equalizable_pairs) equalized, and a summary.
    `maxima` (from `clip_maxima`): per-channel calibration maxima for the pairs joined by Clip(0, b); without them
    those pairs are skipped. Iterates over all pairs up to `iterations` times, stopping early once no scale moves by
    more than `tolerance` (relative). Computed in float64, stored as float32. Weights or biases that other nodes read
    too are copied under a new name rather than changed under the other reader."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    found, skipped = equalizable_pairs(result)
    pairs = []
    for pair in found:
        if pair.bound is not None and (maxima is None or pair.bounded_tensor not in maxima):
            skipped.append((pair.names[0], f"Clip(0, {pair.bound:g}) is exact only below its bound: equalizing "
                                           "through it needs per-channel maxima of calibration images"))
        else:
            pairs.append(pair)
    if not pairs:
        return result, EqualizationSummary(skipped=tuple(skipped))
    arrays: dict[str, np.ndarray] = {}  # working float64 copies, by (possibly new) initializer name
    private = _PrivateWeights(result.graph, arrays)
    initializers = {init.name: init for init in result.graph.initializer}
    kinds = [(conv_kind(pair.first, initializers[pair.first.input[1]]),  # before any weight is renamed
              conv_kind(pair.second, initializers[pair.second.input[1]])) for pair in pairs]
    work = []
    for pair, kind in zip(pairs, kinds):
        w1 = private(pair.first, 1)
        b1 = private(pair.first, 2) if len(pair.first.input) > 2 and pair.first.input[2] else None
        w2 = private(pair.second, 1)
        low, high, held = _limits(pair, maxima or {}, arrays[w1].shape[0])
        work.append((pair, kind, w1, b1, w2, low, high, held))
    total = {pair.names: np.ones(arrays[w1].shape[0]) for pair, _, w1, *_ in work}
    done = 0
    for done in range(1, iterations + 1):
        moved = 0.0
        for pair, (kind1, kind2), w1, b1, w2, low, high, _ in work:
            r1, r2 = _ranges(arrays[w1], kind1, "first"), _ranges(arrays[w2], kind2, "second")
            scale = np.ones_like(r1)
            alive = (r1 > 0) & (r2 > 0)
            scale[alive] = np.sqrt(r1[alive] / r2[alive])
            wanted = total[pair.names] * np.clip(scale, *_SCALE_LIMITS)
            scale = np.clip(wanted, low, high) / total[pair.names]
            arrays[w1] = _scaled(arrays[w1], kind1, "first", scale)
            if b1 is not None:
                arrays[b1] = arrays[b1] / scale
            arrays[w2] = _scaled(arrays[w2], kind2, "second", scale)
            total[pair.names] *= scale
            moved = max(moved, float(np.max(np.abs(scale - 1.0))))
        if moved <= tolerance:
            break
    by_name = {init.name: init for init in result.graph.initializer}
    for name, array in arrays.items():
        by_name[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    all_scales = np.concatenate(list(total.values()))
    return result, EqualizationSummary(
        pairs=tuple(total), skipped=tuple(skipped), iterations=done, max_scale=float(all_scales.max()),
        min_scale=float(all_scales.min()), channels_held=sum(item[-1] for item in work),
        scales={k: v.astype(np.float32) for k, v in total.items()})


class _PrivateWeights:
    """The initializer name a node may change: its own, or a fresh copy when other nodes (or graph outputs) read it
    too. Loads each into `arrays` as float64 on first use."""

    def __init__(self, graph: onnx.GraphProto, arrays: dict[str, np.ndarray]):
        self.graph, self.arrays = graph, arrays
        self.uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.uses[name] = self.uses.get(name, 0) + 1
        for value in graph.output:
            self.uses[value.name] = self.uses.get(value.name, 0) + 1
        self.taken = ({init.name for init in graph.initializer}
                      | {n for node in graph.node for n in (*node.input, *node.output)})

    def __call__(self, node: onnx.NodeProto, position: int) -> str:
        name = node.input[position]
        if name in self.arrays:
            return name
        source = next(init for init in self.graph.initializer if init.name == name)
        array = numpy_helper.to_array(source).astype(np.float64)
        if self.uses.get(name, 0) > 1:
            base, index = f"{name}_equalized", 0
            new = base
            while new in self.taken:
                index += 1
                new = f"{base}_{index}"
            self.taken.add(new)
            self.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), new))
            self.uses[name] -= 1
            self.uses[new] = 1
            node.input[position] = new
            name = new
        self.arrays[name] = array
        return name


def equalize_file(source, target, iterations: int = DEFAULT_ITERATIONS) -> tuple[Path, EqualizationSummary]:
    """`equalize` on an ONNX file (weights embedded), written to `target`; returns (target, summary)."""
    from ptqflow.common.files import write_atomic

    model, summary = equalize(onnx.load(str(source)), iterations)
    target = Path(target)
    write_atomic(target, model.SerializeToString())
    return target, summary
