"""fbgemm keeps in FP32 the depthwise layers its int8 kernel computes inexactly (issue 24, 'engines that compute what
was quantized': a layer kept where it is exact): quantized once with 8-bit inputs, checked against torch's reference
lowering on the calibration images, and the layers that departed stay float; the other layers keep their 8-bit
inputs. The policy is the config's `fbgemm_saturation` ("float", "seven-bit", "allowed"), and every record of the
variant says which layers and why."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, runs_by_name
from saturating_fixture import SaturatingBlock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


class Saturating(SaturatingBlock):
    """SaturatingBlock on raw pixels (its ReLU6 output sits at 6), then a pointwise conv and a small dense head."""

    def __init__(self):
        super().__init__(expand_weight=0.01)
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.project(torch.relu(super().forward(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def saturating_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("saturating") / "saturating.onnx"
    torch.onnx.export(Saturating().eval(), (torch.rand(2, 3, 32, 32) * 255,), str(path), dynamo=False,
                      opset_version=13, input_names=["images"], output_names=["scores"],
                      dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
    return path


def _graphs(path, tmp_path, **config):
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize_graphs
    from ptqflow.models.graph.onnx_model import load_classifier

    images = np.random.default_rng(0).uniform(0, 255, (64, 3, 32, 32)).astype(np.float32)
    model = FloatModel.for_runtimes(load_classifier(path), tmp_path / "work").for_quantization()
    config = PytorchFxConfig(**{"backend": "fbgemm", "weight_rounding": "nearest", **config})
    return quantize_graphs(model, config, images)


def _depthwise(graphs) -> str:
    from ptqflow.models.graph.fx_modules import is_depthwise

    return next(name for name, module in graphs.source.named_modules() if is_depthwise(module))


def _quantized_modules(graphs) -> set[str]:
    return {name for name, module in graphs.converted.named_modules() if hasattr(module, "_packed_params")}


def test_fbgemm_keeps_the_depthwise_layer_it_saturates_in_float_and_the_rest_8_bit(saturating_onnx, tmp_path):
    graphs = _graphs(saturating_onnx, tmp_path)
    depthwise = _depthwise(graphs)
    assert list(graphs.inexact_kept) == [depthwise]
    assert "fbgemm's int8 kernel saturates here" in graphs.inexact_kept[depthwise]
    assert graphs.engine_departures == {}  # what runs in int8 is computed exactly
    quantized = _quantized_modules(graphs)
    assert depthwise not in quantized and len(quantized) == 2  # the two pointwise convolutions
    expand = next(m for name, m in graphs.converted.named_modules() if name in quantized and "expand" in name)
    assert float(expand.scale) == pytest.approx(6.0 / 255, rel=0.02)  # 8-bit output: not cut to 7 bits


@pytest.mark.parametrize("policy, departs", [("seven-bit", False), ("allowed", True)])
def test_the_other_policies_quantize_the_depthwise_layer(saturating_onnx, tmp_path, policy, departs):
    graphs = _graphs(saturating_onnx, tmp_path, fbgemm_saturation=policy)
    depthwise = _depthwise(graphs)
    assert graphs.inexact_kept == {}
    assert depthwise in _quantized_modules(graphs)
    assert (depthwise in graphs.engine_departures) is departs
    expand = next(m for name, m in graphs.converted.named_modules() if "expand" in name and hasattr(m, "scale"))
    assert float(expand.scale) == pytest.approx(6.0 / (127 if policy == "seven-bit" else 255), rel=0.02)


def test_x86_computes_it_exactly_and_keeps_everything_in_int8(saturating_onnx, tmp_path):
    graphs = _graphs(saturating_onnx, tmp_path, backend="x86")
    assert graphs.inexact_kept == {} and graphs.engine_departures == {}
    assert _depthwise(graphs) in _quantized_modules(graphs)


def test_every_record_of_the_variant_names_the_layer(saturating_onnx, tmp_path, cifar_dir, tracking_store):
    from ptqflow import quantize
    from ptqflow.models.backends.mac_share import MacTable
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.tracking.keys import Param, Tag

    result = quantize(saturating_onnx, cifar_dir, ["pytorch-fx-int8"], calibration_size=CALIBRATION_SIZE,
                      bench=False, adaround_iterations=ADAROUND_ITERATIONS, register=False, preprocessing="raw")
    assert result["pytorch-fx-int8"].status == "ok", result["pytorch-fx-int8"].reason
    run = runs_by_name()["pytorch-fx-int8"]
    assert "fbgemm's int8 kernel saturates here" in run.data.tags[Tag.KEPT_FLOAT]
    assert "FP32 where fbgemm saturates" in run.data.params[Param.QCONFIG]
    assert Tag.ENGINE_DEPARTURES not in run.data.tags
    table = MacTable(load_classifier(saturating_onnx).proto)
    everything = table.share(PytorchFxConfig(backend="fbgemm", speed_check=False))
    share = run.data.params[Param.INT8_MAC_SHARE]
    assert float(share) < everything  # the depthwise layer's MACs left out

    from mlflow.tracking import MlflowClient

    from ptqflow.tracking.logged_models import logged_model_uri

    model_id = logged_model_uri(run).split("/")[-1]
    assert MlflowClient().get_logged_model(model_id).params[Param.INT8_MAC_SHARE] == share  # the model carries it
