"""The int8 engines compute what was quantized (issue 24, 'engines that compute what was quantized'): fbgemm's
depthwise kernels sum uint8 x int8 products in pairs into 16 bits, which saturate at full-range activations (the
6-point gap between the fbgemm and x86 variants of a MobileNet). The recipe quantizes what feeds a depthwise layer
to 7 bits on fbgemm when asked (fbgemm_saturation "seven-bit"; the default keeps the layers that saturate in FP32,
tests/test_fx_exactness.py), quantizes a layer's output to the range of the clip after it, and every FX variant
checks each int8 layer against torch's reference lowering of its quantization."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from saturating_fixture import SaturatingBlock

from ptqflow.models.backends.engine_check import describe_departures, engine_departures
from ptqflow.models.backends.fx_qconfig import activation_bounds, fbgemm_depthwise_inputs, qconfig_mapping

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")



def _quantized(engine: str, seven_bit: bool, checked=None, batch_size: int = 64):
    import copy

    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    graph = torch.fx.symbolic_trace(SaturatingBlock().eval())
    images = np.random.default_rng(0).uniform(0.0, 6.0, (32, 3, 8, 8)).astype(np.float32)
    mapping = qconfig_mapping(engine, bounded_outputs=activation_bounds(graph),
                              seven_bit_outputs=fbgemm_depthwise_inputs(graph) if seven_bit else ())
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        prepared = prepare_fx(copy.deepcopy(graph), mapping, (torch.from_numpy(images[:2]),))
        with torch.no_grad():
            prepared(torch.from_numpy(images))
        graphs = types.SimpleNamespace(prepared=prepared, converted=convert_fx(copy.deepcopy(prepared)),
                                       backend_config=None)
        return engine_departures(graphs, images if checked is None else checked, batch_size)
    finally:
        torch.backends.quantized.engine = previous


def test_the_recipe_finds_the_clip_ranges_and_what_feeds_depthwise_layers():
    graph = torch.fx.symbolic_trace(SaturatingBlock().eval())
    assert activation_bounds(graph) == {"expand": (0.0, 6.0)}
    assert fbgemm_depthwise_inputs(graph) == ["expand"]  # through the clip, to the layer whose output it keeps


def test_fbgemm_saturates_on_full_range_depthwise_inputs_and_the_check_names_the_layer():
    departed = _quantized("fbgemm", seven_bit=False)
    assert list(departed) == ["depthwise"] and departed["depthwise"] > 0.01, departed
    assert describe_departures(departed).startswith("depthwise: ")


def test_a_model_with_its_batch_fixed_at_one_is_checked_on_many_images_one_by_one():
    """The first image is dark (nothing saturates on it); the check of a batch-1 model used to stop there."""
    images = np.random.default_rng(1).uniform(0.0, 6.0, (64, 3, 8, 8)).astype(np.float32)
    images[0] = -10.0  # the expand layer's ReLU6 gives 0 everywhere
    assert _quantized("fbgemm", seven_bit=False, checked=images[:1], batch_size=1) == {}
    departed = _quantized("fbgemm", seven_bit=False, checked=images, batch_size=1)
    assert list(departed) == ["depthwise"] and departed["depthwise"] > 0.01, departed


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_with_the_recipe_every_int8_layer_computes_its_quantization(engine):
    assert _quantized(engine, seven_bit=engine == "fbgemm") == {}


def test_a_layer_the_engine_computes_wrongly_gets_its_own_hint_in_the_diagnosis():
    from ptqflow.models.diagnosis.records import LayerDiagnosis, hint_for

    row = LayerDiagnosis("dw", "Conv", 0.1, 45.0, 12.0, 10.0, True, "x", "y", engine_departure=0.0123)
    hint = hint_for(row)
    assert hint.startswith("the int8 engine computes this layer away from its quantization (1.23% of outputs")
    assert "x86 engine" in hint
    assert hint_for(LayerDiagnosis("dw", "Conv", 0.1, 45.0, 12.0, 10.0, True, "x", "y")).startswith("activation")


class Residual(nn.Module):
    """stem, then conv -> ReLU -> conv + the stem's output -> ReLU: onednn's pattern config fuses the second conv
    with the Add and the ReLU. `reuse`: the stem's output is read again after the sum (a concatenation)."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.out_relu, self.reuse = nn.ReLU(), nn.ReLU(), reuse

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.out_relu(self.conv2(self.relu(self.conv1(x))) + x)
        return torch.cat([y, x], 1) if self.reuse else y


def _onednn(model: nn.Module):
    import copy

    from torch.ao.quantization.backend_config.onednn import get_onednn_backend_config
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    images = np.random.default_rng(0).uniform(0.0, 1.0, (32, 3, 8, 8)).astype(np.float32)
    config = get_onednn_backend_config()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        prepared = prepare_fx(torch.fx.symbolic_trace(model.eval()), qconfig_mapping("onednn"),
                              (torch.from_numpy(images[:2]),), backend_config=config)
        with torch.no_grad():
            prepared(torch.from_numpy(images))
        converted = convert_fx(copy.deepcopy(prepared), backend_config=config)
        return types.SimpleNamespace(prepared=prepared, converted=converted, backend_config=config), images
    except BaseException:
        torch.backends.quantized.engine = previous
        raise


@pytest.fixture
def onednn_engine():
    previous = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = previous


def test_onednn_fuses_the_residual_add_and_computes_it_as_quantized(onednn_engine):
    """The fused kernel writes its sum into the residual's buffer: the check copies every input before a module
    runs, so the layer that made the residual is compared with what it computed, not with the sum."""
    from torch.ao.nn.intrinsic.quantized import ConvAddReLU2d

    from ptqflow.models.backends.engine_check import overwritten_residuals

    graphs, images = _onednn(Residual())
    fused = [name for name, module in graphs.converted.named_modules() if isinstance(module, ConvAddReLU2d)]
    assert fused == ["conv2"]
    assert engine_departures(graphs, images) == {}
    assert overwritten_residuals(graphs.converted) == []
    # the premise: the fused kernel's residual input (channels-last, as a conv's output is) holds the sum afterwards
    module, last = graphs.converted.conv2, torch.channels_last
    a = torch.quantize_per_tensor(torch.rand(2, 8, 8, 8).contiguous(memory_format=last), 0.05, 0, torch.quint8)
    residual = torch.quantize_per_tensor(torch.rand(2, 8, 8, 8).contiguous(memory_format=last), module.scale,
                                         module.zero_point, torch.quint8)
    before = residual.int_repr().clone()
    with torch.no_grad():
        out = module(a, residual)
    assert not torch.equal(residual.int_repr(), before) and torch.equal(residual.int_repr(), out.int_repr())


def test_a_residual_read_after_the_fused_add_is_named_so_the_variant_is_refused(onednn_engine):
    from ptqflow.models.backends.engine_check import overwritten_residuals

    graphs, _ = _onednn(Residual(reuse=True))
    assert overwritten_residuals(graphs.converted) == ["conv2"]


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: the residual Add's first input is the stem's output (a convolution's, no activation),
    its second the projection's; torch's onednn patterns for "x + conv(y)" fuse it wrongly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.project = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.relu6_a, self.relu6_b = nn.ReLU6(), nn.ReLU6()

    def forward(self, x):
        x = self.stem(x)
        return x + self.project(self.relu6_b(self.depthwise(self.relu6_a(self.expand(x)))))


@pytest.mark.parametrize("model,falls_back", [(Residual(), False), (InvertedResidual(), True)])
def test_onednn_leaves_out_the_add_patterns_that_change_the_function_and_says_so(onednn_engine, model, falls_back):
    from ptqflow.models.backends.pytorch_fx import CONV_SECOND_FALLBACK, PytorchFxConfig, _computes_like, \
        fx_quantization, prepare_checked

    source = torch.fx.symbolic_trace(model.eval())
    example = torch.rand(2, 3, 8, 8)
    with fx_quantization("onednn"):
        prepared, _, fallback = prepare_checked(source, qconfig_mapping("onednn"), example,
                                                PytorchFxConfig(backend="onednn"))
        assert _computes_like(source, prepared, example)
    assert fallback == (CONV_SECOND_FALLBACK if falls_back else "")
