"""Bias correction of depthwise layers after AdaRound (issue 24 §4): a channel's mean error is taken off its bias
where it generalizes across the images, counted only where the activation after the layer passes values on; the
corrected biases reach the ONNX model the backends quantize, and only depthwise layers' biases move."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from onnx_fixture import batchnorm_cnn
from torch import nn


def _depthwise(channels: int = 6) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels).eval()


def test_a_consistent_shift_is_taken_off_and_noise_is_left_alone():
    from ptqflow.models.adaround.bias_correction import correct_bias

    module = _depthwise()
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(64, 6, 5, 5, generator=generator)
    shift = torch.tensor([0.3, -0.2, 0.5, 0.0, 0.0, 0.0]).view(1, -1, 1, 1)
    noise = 0.05 * torch.randn(64, 6, 5, 5, generator=generator)
    output = target + shift + noise
    before = module.bias.detach().clone()
    corrected = correct_bias(module, output, target)
    moved = before - module.bias.detach()
    assert corrected >= 3
    assert torch.allclose(moved[:3], shift.flatten()[:3], atol=0.01), moved
    # the noise-only channels move by no more than their mean noise (about 0.05 / sqrt(1600))
    assert float(moved[3:].abs().max()) < 0.01
    after = output - moved.view(1, -1, 1, 1)
    assert float((after - target).pow(2).mean()) < float((output - target).pow(2).mean())


def test_values_the_activation_clips_do_not_set_the_correction():
    """A ReLU6 after the layer: errors of values below 0 go nowhere; the correction is the in-range mean."""
    from ptqflow.models.adaround.bias_correction import UNBOUNDED, correct_bias

    generator = torch.Generator().manual_seed(2)
    target = torch.rand(40, 6, 4, 4, generator=generator) * 12 - 6  # half of it below 0
    error = torch.where(target > 0, torch.full_like(target, 0.1), torch.full_like(target, -2.0))
    for passed, expected in (((0.0, 6.0), 0.1), (UNBOUNDED, None)):
        module = _depthwise()
        before = module.bias.detach().clone()
        correct_bias(module, target + error, target, passed)
        moved = before - module.bias.detach()
        if expected is not None:
            assert torch.allclose(moved, torch.full_like(moved, expected), atol=1e-6), moved
        else:  # unbounded, the clipped values' large errors dominate
            assert float(moved.max()) < -0.5


def test_activation_ranges_reads_relu_relu6_and_clip():
    import torch.fx as fx

    from ptqflow.models.graph.fx_modules import sole_reader_ranges

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.relu, self.relu6, self.tanh = nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0)

        def forward(self, x):
            return self.tanh(self.c(self.relu6(self.b(self.relu(self.a(x))))))

    ranges = sole_reader_ranges(fx.symbolic_trace(Net()), relu=True)
    assert ranges == {"a": (0.0, math.inf), "b": (0.0, 6.0), "c": (-1.0, 2.0)}


@pytest.mark.parametrize("depthwise", [True, False])
def test_adaround_writes_corrected_depthwise_biases_into_the_onnx_model(tmp_path, depthwise):
    """The sweep's path: BatchNorm folded (so every Conv has a bias), AdaRound with bias correction; the rounded
    ONNX model's depthwise bias moved (and FloatModel counts the channels), every other bias stayed; the corrected
    layer's mean error over the images is smaller than without the correction."""
    import onnxruntime as ort

    from ptqflow.models.adaround.onnx import adaround_onnx
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.models.graph.rewrites import fold_batch_norms

    path = tmp_path / "model.onnx"
    proto, _ = fold_batch_norms(batchnorm_cnn(conv_bias=True, depthwise=depthwise, seed=3))
    path.write_bytes(proto.SerializeToString())
    images = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32) * 4
    source = FloatModel.for_runtimes(load_classifier(path), tmp_path / "work").for_quantization()
    rounded = source.with_adarounded_weights("per_channel_sym_int8", images, "test-images", iterations=50)
    conv_biases = [node.input[2] for node in source.onnx.proto.graph.node if node.op_type == "Conv"]
    before = {i.name: numpy_helper.to_array(i) for i in source.onnx.proto.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in rounded.onnx.proto.graph.initializer}
    moved = [name for name in conv_biases if not np.array_equal(before[name], after[name])]
    if not depthwise:
        assert moved == [] and rounded.bias_corrected_channels == 0
        return
    assert moved == [conv_biases[1]] and rounded.bias_corrected_channels > 0
    assert rounded.bias_corrected_channels == int((before[moved[0]] != after[moved[0]]).sum())

    uncorrected = adaround_onnx(source.onnx.proto, images, "per_channel_sym_int8", iters=50, bias_correction=False)
    nodes = source.onnx.proto.graph.node
    second_conv = [node for node in nodes if node.op_type == "Conv"][1].output[0]
    activation = next(node.output[0] for node in nodes if node.op_type == "Relu" and node.input[0] == second_conv)

    def activation_output(model) -> np.ndarray:
        from onnx import helper

        extended = type(model)()
        extended.CopyFrom(model)
        extended.graph.output.append(helper.make_empty_tensor_value_info(activation))
        session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run([activation], {session.get_inputs()[0].name: images})[0]

    reference = activation_output(source.onnx.proto)

    def mean_error(model) -> float:  # what later layers see: each channel's mean error after the ReLU
        return float(np.abs((activation_output(model) - reference).mean(axis=(0, 2, 3))).mean())

    assert mean_error(rounded.onnx.proto) < mean_error(uncorrected)
