"""What the FX recipe's activation observers see: the model input over its whole range (pixels are not outliers), and,
whatever the observer method, a layer's output only within the range of the clip that alone reads it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ptqflow.models.backends.fx_qconfig import qconfig_mapping
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize_graphs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

X86 = PytorchFxConfig(backend="x86", weight_rounding="nearest")


def _pixels() -> np.ndarray:
    """Raw 0..255 pixels, mostly below 200, with the top of the scale on a handful: a percentile clips those."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (40, 32, 32, 3)).astype(np.float32)
    images.reshape(-1)[rng.choice(images.size, 5, replace=False)] = 255.0
    return images


def _input_quantization(converted) -> tuple[float, int]:
    placeholder = next(node for node in converted.graph.nodes if node.op == "placeholder")
    quantize = next(user for user in placeholder.users if "quantize_per_tensor" in str(user.target))
    scale, zero_point = (getattr(converted, arg.target) if hasattr(arg, "target") else arg
                         for arg in quantize.args[1:3])
    return float(scale), int(zero_point)


def test_the_model_input_is_quantized_over_its_whole_range_so_pixels_stay_exact(tiny_float_model):
    images = _pixels()
    whole = quantize_graphs(tiny_float_model, X86, images)
    scale, zero_point = _input_quantization(whole.converted)
    assert scale == pytest.approx(1.0) and zero_point == 0  # one step per pixel value
    pixels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(torch.quantize_per_tensor(pixels, scale, zero_point, torch.quint8).dequantize(), pixels)
    assert "input over its calibration range" in X86.qconfig_summary()

    clipped = quantize_graphs(tiny_float_model, replace(X86, whole_input_range=False), images)
    clipped_scale, _ = _input_quantization(clipped.converted)
    assert clipped_scale < 0.9  # the percentile left out the brightest pixels
    assert "input over" not in replace(X86, whole_input_range=False).qconfig_summary()


@pytest.mark.parametrize("method", ["minmax", "histogram", "moving_minmax", "percentile"])
def test_every_observer_keeps_a_clipped_output_to_the_clip_range(method):
    """A layer whose sole reader is a ReLU6: the large negative values of its dead channels never pass the clip,
    and an observer that took them in spread its 256 steps over [-60, 6] (a VWW-shaped MobileNetV1 agreed 60 %)."""
    mapping = qconfig_mapping("x86", activation_observer=method, bounded_outputs={"conv": (0.0, 6.0)})
    observer = mapping.module_name_qconfigs["conv"].activation()
    values = torch.cat([torch.full((500,), -60.0), torch.linspace(0.0, 9.0, 200_000)])
    observer(values)
    scale, zero_point = observer.calculate_qparams()
    assert int(zero_point) == 0
    assert 5.0 / 255 < float(scale) <= 6.0 / 255 + 1e-6  # the clip's range at most, not the tensor's [-60, 9]


class _Scaled(torch.nn.Module):
    """A plain export's front: the pixels divided by 255 before the first convolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x / 255.0)


def test_the_input_observers_are_found_through_functions_before_the_first_layer():
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    from ptqflow.models.backends.fx_qconfig import PercentileObserver, observe_whole_input_range

    images = torch.from_numpy(_pixels()[:, :, :, :1].transpose(0, 3, 1, 2).copy())
    images[3, 0, 5, 5] = 255.0
    prepared = prepare_fx(_Scaled().eval(), qconfig_mapping("x86"), (images[:1],))
    observers = {type(m) for m in prepared.modules()}
    assert PercentileObserver in observers
    changed = observe_whole_input_range(prepared)
    first = prepared.get_submodule(changed[0])
    assert len(changed) == 1 and type(first) is MinMaxObserver  # the division's output, which the conv reads
    assert any(isinstance(m, PercentileObserver) for m in prepared.modules())  # the conv's own output: unchanged
    with torch.no_grad():
        prepared(images)
    assert float(first.max_val) == pytest.approx(1.0) and float(first.min_val) == float(images.min()) / 255
