"""The FX speed check: a convolution whose int8 module is slower than float in the variant's engine here stays
float, with the activation that alone reads it, and every record of the variant says which and why (issue 24,
item 5: fbgemm took 2.3 ms for one image of a MobileNetV1 0.25 whose four 4x4 depthwise layers it computes the
generic way, 0.36 ms with them in float)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, runs_by_name
from onnx_fixture import fit_dense_head, tiny_cnn

torch = pytest.importorskip("torch")


def _prepared(model: onnx.ModelProto, example):
    from ptqflow.models.graph.fx_prep import prepare_graph
    from ptqflow.models.graph.onnx2torch_import import convert

    return prepare_graph(convert(model).eval(), example_input=example)


def _seed(conv, engine: str, fp32_us: float, int8_us: float) -> None:
    """One convolution's timings where the speed check keeps them, as a measurement on this machine would."""
    from ptqflow.common.files import write_json_atomic
    from ptqflow.models.backends.fx_speed_check import fx_timing_key
    from ptqflow.models.backends.speed_check import cache_file

    key, payload = fx_timing_key(conv, engine)
    write_json_atomic(cache_file(key), {**payload, "fp32_us": fp32_us, "int8_us": int8_us})


def test_each_convolution_is_timed_as_the_graph_prepared_module_calls_it():
    """The geometry timed is the one FX quantizes: tiny_cnn's stride-2 conv with TF "same" padding is the 4x4
    kernel graph preparation folds the pad into; both forms run in each engine."""
    from ptqflow.models.backends.fx_speed_check import conv_calls, time_torch_conv

    x = torch.rand(2, 32, 32, 3) * 255
    calls = conv_calls(_prepared(tiny_cnn(), x), x)
    assert [(c.input_shape, c.kernel_size, c.stride, c.padding) for c in calls.values()] == [
        ((1, 3, 32, 32), (3, 3), (1, 1), (1, 1)), ((1, 8, 32, 32), (4, 4), (2, 2), (1, 1))]
    for engine in ("fbgemm", "x86"):
        for conv in calls.values():
            timing = time_torch_conv(conv, engine)
            assert timing.fp32_us > 0 and timing.int8_us > 0


def test_a_layer_slower_in_int8_stays_float_and_every_record_says_why(tmp_path, cifar_dir, tracking_store,
                                                                      monkeypatch):
    """With the stem's fbgemm int8 module 100x its float one and the second convolution's 10x faster, the fbgemm
    variant keeps the stem in float and only it: the converted module, the kept_float tag, the qconfig, the int8
    MAC share and the diagnosis all say so."""
    from ptqflow import quantize
    from ptqflow.models.backends.fx_speed_check import conv_calls
    from ptqflow.models.backends.mac_share import MacTable
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
    from ptqflow.models.graph.layer_map import node_for_name
    from ptqflow.models.graph.rewrites import name_unnamed_nodes
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.tracking.keys import Artifact, Param, Tag

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # seeded timings for this test only
    train = load_cifar10(cifar_dir).train
    model = fit_dense_head(name_unnamed_nodes(tiny_cnn()), train.images.transpose(0, 2, 3, 1).astype(np.float32),
                           train.labels)
    path = tmp_path / "speedy.onnx"
    onnx.save(model, str(path))
    x = torch.rand(2, 32, 32, 3) * 255
    (stem, stem_call), (second, second_call) = conv_calls(_prepared(model, x), x).items()
    _seed(stem_call, "fbgemm", fp32_us=5.0, int8_us=500.0)
    _seed(second_call, "fbgemm", fp32_us=50.0, int8_us=5.0)

    result = quantize(path, cifar_dir, ["pytorch-fx-int8"], calibration_size=CALIBRATION_SIZE, bench=False,
                      adaround_iterations=ADAROUND_ITERATIONS, register=False, diagnose=True, diagnose_images=32)
    report = result["pytorch-fx-int8"]
    assert report.status == "ok", report.reason
    run = runs_by_name()["pytorch-fx-int8"]
    assert run.data.tags[Tag.KEPT_FLOAT] == (f"{stem}: fbgemm int8 kernel slower here: 500.0 µs against 5.0 µs in FP32 "
                                             "(batch 1, 1 thread)")
    assert "FP32 where int8 is slower" in run.data.params[Param.QCONFIG]

    table = MacTable(model)
    share = float(run.data.params[Param.INT8_MAC_SHARE])
    without = table.share(PytorchFxConfig(backend="fbgemm", speed_check=False))
    stem_macs = next(layer.macs for layer in table.layers if layer.name == stem)
    assert share == pytest.approx(without - stem_macs / table.total, abs=2e-4) and share < without

    scripted = torch.jit.load(str(report.model_file))
    packed = [name for name, sub in scripted.named_modules() if hasattr(sub, "_packed_params")]
    assert packed == [second]  # the second convolution alone runs in int8

    from mlflow.tracking import MlflowClient

    local = MlflowClient().download_artifacts(run.info.run_id, Artifact.DIAGNOSIS_JSON, str(tmp_path / "diag"))
    rows = {row["layer"]: row for row in json.loads(open(local).read())["layers"]}
    assert "fbgemm int8 kernel slower here" in rows[stem]["float_reason"]
    assert rows[node_for_name(second, [node.name for node in model.graph.node])]["float_reason"] == ""


def _clip_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="first"),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], kernel_shape=[1, 1], name="second")]
    graph = helper.make_graph(nodes, "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_float_layers_relu6_stays_float_with_it():
    """Quantized on its own, the ReLU6 after a float convolution observed its input unbounded (negative values
    included: a wider range and a zero point off 0, which cost the fbgemm variant of a MobileNetV1 0.4 points);
    it stays float with the convolution, and the next layer's input is quantized after the clip."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, _qconfig_mapping
    from ptqflow.models.graph.fx_modules import sole_readers

    x = torch.randn(2, 3, 8, 8)
    gm = _prepared(_clip_model(), x)
    convs = [n.target for n in gm.graph.nodes if n.op == "call_module" and "Conv" in type(gm.get_submodule(
        n.target)).__name__]
    first = convs[0]
    (clip,) = sole_readers(gm, {first})
    mapping = _qconfig_mapping(PytorchFxConfig(backend="x86", float_head=False), gm, slower=[first])
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(gm, mapping, example_inputs=(x,))
    with torch.no_grad():
        prepared(x)
    converted = convert_fx(prepared)
    nodes = {n.target: n for n in converted.graph.nodes if n.op == "call_module"}
    assert not hasattr(converted.get_submodule(first), "_packed_params")
    assert nodes[clip].args[0].target == first  # float conv -> float clip, no quantize between them
    quantize = next(iter(nodes[clip].users))
    assert quantize.target == torch.quantize_per_tensor
    scale, zero_point = (getattr(converted, a.target) for a in quantize.args[1:3])
    assert int(zero_point) == 0 and 255 * float(scale) <= 6.0 + 1e-6  # the clip's own range, from 0
