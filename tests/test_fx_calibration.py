"""FX calibration done once for graphs that observe the same thing: the sweep's fbgemm and x86 variants prepare the
same observed graph and calibrate it on the same images, so the second one takes the first one's observer state;
anything that shapes that state (images, observer settings, weights) calibrates again."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import ptqflow.models.backends.pytorch_fx as quantize_pytorch
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize_graphs

# every convolution in int8 under both engines: the FX speed check can keep one in float under fbgemm alone on a CPU
# where fbgemm's kernel is slow for it, and the two graphs would then observe different things
X86 = PytorchFxConfig(backend="x86", weight_rounding="nearest", speed_check=False)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


def _observer_state(graphs) -> dict:
    return {name: value.clone() for name, value in graphs.prepared.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forwards(monkeypatch) -> list:
    """Counts calibration batches run through an observed graph."""
    from torch.ao.quantization import ObserverBase

    calls = []
    original = torch.fx.GraphModule.__call__

    def counting(self, *args, **kwargs):
        if any(isinstance(module, ObserverBase) for module in self.modules()):  # not the converted graph's checks
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.GraphModule, "__call__", counting)
    return calls


def test_the_second_backend_takes_the_first_ones_calibration_and_it_is_the_same(tiny_float_model, monkeypatch):
    images = _images(60)
    quantize_pytorch._LAST_CALIBRATION.clear()
    fbgemm = quantize_graphs(tiny_float_model, replace(X86, backend="fbgemm"), images)
    calls = _forwards(monkeypatch)
    reused = quantize_graphs(tiny_float_model, X86, images)
    assert reused.calibration_images == 60
    reused_calls = len(calls)
    quantize_pytorch._LAST_CALIBRATION.clear()
    fresh = quantize_graphs(tiny_float_model, X86, images)
    assert reused_calls == 0 and len(calls) > 0  # a fresh calibration runs its batches; the reused one ran none
    assert _same(_observer_state(reused), _observer_state(fresh))
    assert _same(_observer_state(reused), _observer_state(fbgemm))
    example = torch.from_numpy(images[:8])
    torch.backends.quantized.engine = "x86"
    with torch.no_grad():
        assert torch.equal(reused.converted(example), fresh.converted(example))


@pytest.mark.parametrize("change", ["images", "percentile", "weights"])
def test_what_shapes_the_observers_calibrates_again(tiny_float_model, monkeypatch, change):
    images = _images(60)
    quantize_pytorch._LAST_CALIBRATION.clear()
    first = quantize_graphs(tiny_float_model, X86, images)
    config, model = X86, tiny_float_model
    if change == "images":
        images = _images(60, seed=1)
    elif change == "percentile":
        config = replace(X86, percentile=99.9)
    else:
        with torch.no_grad():
            next(p for p in model.torch_module.parameters() if p.dim() == 4).mul_(1.5)
    calls = _forwards(monkeypatch)
    second = quantize_graphs(model, config, images)
    assert calls, "calibrated again"
    assert not _same(_observer_state(first), _observer_state(second))


def test_one_image_batches_are_pooled_before_a_percentile_is_taken():
    """A model with its batch fixed at 1 calibrates image by image: the 99.995th percentile of one image's few
    thousand values is its maximum, and the average of those clipped far more of the data than the percentile of all
    of it (a batch-1 MobileNetV1's FX variants agreed 90 %, its onnxruntime ones 99 %). Pooled, one image at a time
    gives the range one batch of them gives."""
    from ptqflow.models.backends.fx_qconfig import PercentileObserver

    images = torch.from_numpy(np.random.default_rng(0).exponential(1.0, (256, 8, 16, 16)).astype(np.float32))

    def range_of(observer, batch: int) -> float:
        for start in range(0, len(images), batch):
            observer(images[start:start + batch])
        return float(observer.max_val)

    whole = range_of(PercentileObserver(), 256)
    one_by_one = range_of(PercentileObserver(), 1)
    unpooled = range_of(PercentileObserver(pool_values=1), 1)  # as before: a percentile per image
    assert abs(one_by_one - whole) / whole < 0.05, (one_by_one, whole)
    assert unpooled < 0.85 * whole, (unpooled, whole)
    few = PercentileObserver()
    few(images[:1])  # fewer values than a pool: a provisional range, not none
    assert float(few.max_val) > 0
