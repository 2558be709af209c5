"""Models as other exporters write them sweep like ResNet8 (issue 24, "any opset, any exporter"): a plain
`torch.onnx.export` at opset 17 traces in FX (onnx2torch's Div asks its tensors' dtype, which FX cannot trace), a
module FX still cannot trace stays a float leaf instead of failing the variant, and an opset-11 MobileNetV1 with
a fixed batch of 1 and exporter-shared biases converts, is brought up to opset 13 for per-channel ONNX Runtime
variants, and records both opsets; what torch's default (dynamo) exporter writes at opset 20 sweeps too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cifar_fixture import gray_dataset, write_npz
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE
from exporter_fixture import mobilenet_v1_opset11, plain_export_cnn

from ptqflow import quantize

FX_VARIANTS = ("pytorch-fx-int8", "pytorch-fx-int8-x86", "pytorch-fx-int8-onednn")
# Floors measured on these fixtures (see each test): they train for seconds, so a quantized variant can differ
# from FP32 on an image or two near a decision boundary, never on many.
AGREEMENT_FLOOR = 0.9


@pytest.fixture(scope="module")
def grey_data(tmp_path_factory):
    train, test, names = gray_dataset(classes=7, size=(48, 48), train_per_class=20, test_per_class=10)
    root = tmp_path_factory.mktemp("grey")
    return write_npz(root / "grey.npz", train, test, names), train


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory, grey_data):
    _, (images, labels) = grey_data
    return plain_export_cnn(tmp_path_factory.mktemp("plain") / "plain_cnn.onnx", images, labels, classes=7)


def test_the_plain_export_has_the_ops_that_failed_to_trace(plain_model):
    ops = {node.op_type for node in onnx.load(str(plain_model)).graph.node}
    assert ops == {"Constant", "Div", "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert onnx.load(str(plain_model)).opset_import[0].version == 17


def test_a_plain_torch_export_sweeps_in_every_fx_variant(plain_model, grey_data, tmp_path):
    data, _ = grey_data
    results = quantize(plain_model, data, variants=[*FX_VARIANTS, "ort-int8"], track=False, output_dir=tmp_path,
                       calibration_size=CALIBRATION_SIZE, adaround_iterations=ADAROUND_ITERATIONS, bench=False)
    assert results["fp32"].accuracy > 0.5  # the fixture model really classifies
    for name in (*FX_VARIANTS, "ort-int8"):
        assert results[name].status == "ok", results[name].reason
        assert results[name].agreement >= AGREEMENT_FLOOR, (name, results[name].agreement)


NEWER_OPSETS = (18, 19, 20, 21, 22)  # onnx2torch 1.5.15 knows Pad to 13, Reshape to 14, Conv to 11


def _at_opset(model_path, opset: int, path):
    from onnx import version_converter

    onnx.save(version_converter.convert_version(onnx.load(str(model_path)), opset), str(path))
    return path


@pytest.mark.parametrize("opset", NEWER_OPSETS)
def test_an_export_at_a_newer_opset_converts_to_the_same_function(plain_model, opset, tmp_path):
    """onnx2torch has no converter past the op versions it was written for: at opset 18 the first Pad failed
    ("Converter is not implemented ... 'Pad', version=18"), at 19 Reshape, at 22 Conv. Versions that add only types,
    or inputs and attributes the node leaves out, convert as the newest version onnx2torch has."""
    import onnxruntime as ort
    import torch

    from ptqflow.models.graph.onnx2torch_import import convert

    path = _at_opset(plain_model, opset, tmp_path / f"plain_{opset}.onnx")
    x = np.random.default_rng(opset).uniform(0, 255, (3, 1, 48, 48)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        converted = convert(onnx.load(str(path))).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(converted, expected, rtol=1e-4, atol=1e-4)


def test_a_newer_op_version_using_what_onnx2torch_lacks_is_refused_by_name():
    """Pad-18's `axes` input has no counterpart in onnx2torch's Pad-13: the conversion names it instead of
    converting something else."""
    from ptqflow.models.graph.onnx2torch_import import convert

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    pads = onnx.numpy_helper.from_array(np.array([1, 1], np.int64), "pads")
    axes = onnx.numpy_helper.from_array(np.array([3], np.int64), "axes")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])], "pad",
                                   [x], [y], [pads, axes])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(NotImplementedError, match="Pad-18 with input axes"):
        convert(model)


def test_an_opset_22_export_sweeps_in_every_fx_variant(plain_model, grey_data, tmp_path):
    data, _ = grey_data
    model = _at_opset(plain_model, 22, tmp_path / "plain_22.onnx")
    results = quantize(model, data, variants=[*FX_VARIANTS, "ort-int8"], track=False, output_dir=tmp_path / "out",
                       calibration_size=CALIBRATION_SIZE, adaround_iterations=ADAROUND_ITERATIONS, bench=False)
    for name in (*FX_VARIANTS, "ort-int8"):
        assert results[name].status == "ok", results[name].reason
        assert results[name].agreement >= AGREEMENT_FLOOR, (name, results[name].agreement)


def test_a_module_fx_cannot_trace_stays_a_float_leaf(plain_model):
    """Without the example input that tells Div's operands are float (here its divisor passes an Identity, so it
    is not read as a constant either), the Div module stays onnx2torch's: FX cannot trace it, and prepare_traced
    keeps it as a leaf instead of failing the variant."""
    import torch
    from torch.ao.quantization.quantize_fx import convert_fx

    from ptqflow.models.backends.fx_qconfig import qconfig_mapping
    from ptqflow.models.backends.pytorch_fx import prepare_traced
    from ptqflow.models.graph.fx_prep import prepare_graph, untraceable_modules
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    proto = onnx.load(str(plain_model))
    div = next(node for node in proto.graph.node if node.op_type == "Div")
    proto.graph.node.insert(list(proto.graph.node).index(div),
                            onnx.helper.make_node("Identity", [div.input[1]], ["divisor"], name="divisor"))
    div.input[1] = "divisor"
    module = import_onnx2torch().convert(proto).eval()
    graph = prepare_graph(module)  # no example input
    untraceable = untraceable_modules(graph)
    assert list(untraceable) == ["Div"] and "TraceError" in untraceable["Div"]
    example = torch.rand(4, 1, 48, 48) * 255
    prepared = prepare_traced(graph, qconfig_mapping("fbgemm"), example, None)
    with torch.no_grad():
        prepared(example)
        converted = convert_fx(prepared)
        assert "Div" in dict(converted.named_children())  # the leaf, still onnx2torch's module
        reference, quantized = graph(example), converted(example)
    assert torch.allclose(reference, quantized, atol=0.1 * reference.abs().max().item())


@pytest.fixture(scope="module")
def mobilenet_opset11(tmp_path_factory, cifar_dir):
    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    return mobilenet_v1_opset11(tmp_path_factory.mktemp("mnv1") / "mobilenet_v1.onnx",
                                train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels, classes=10)


def test_an_opset_11_mobilenet_with_shared_biases_sweeps_in_every_default_variant(mobilenet_opset11, cifar_dir,
                                                                                   tracking_store):
    from mlflow.tracking import MlflowClient

    model = onnx.load(str(mobilenet_opset11))
    assert model.opset_import[0].version == 11
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # fixed batch
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    assert identities  # the exporter shares equal biases through Identity nodes, which onnx2torch cannot read
    # Keras/TFLite shapes: Pad amounts and the classifier's reshape computed by integer nodes (FX failed on them)
    assert {"Pad", "Cast", "Shape", "Gather"} <= {n.op_type for n in model.graph.node}
    results = quantize(mobilenet_opset11, cifar_dir, calibration_size=CALIBRATION_SIZE, preprocessing="unit",
                       adaround_iterations=ADAROUND_ITERATIONS, bench=False, diagnose=False, register=False)
    assert results["fp32"].accuracy > 0.3  # ten classes, a briefly trained model
    for report in results:
        if report.name == "pytorch-fx-uint8":
            assert report.status == "unsupported"
            continue
        assert report.status == "ok", (report.name, report.reason)
        assert report.agreement >= AGREEMENT_FLOOR, (report.name, report.agreement)
        share = MlflowClient().get_run(report.run_id).data.params.get("int8_mac_share")  # shapes known past Pads
        assert report.name == "fp32" or (share is not None and float(share) > 0.5), (report.name, share)
    params = MlflowClient().get_run(results.parent_run_id).data.params
    assert (params["model_opset"], params["quantization_opset"]) == ("11", "13")
    per_channel_file = onnx.load(str(results["ort-int8"].model_file))
    assert next(o.version for o in per_channel_file.opset_import if o.domain in ("", "ai.onnx")) >= 13


def test_per_channel_onnx_runtime_refuses_a_model_left_below_opset_13_in_one_line(mobilenet_opset11, tmp_path):
    """When the version converter cannot bring a model to opset 13, the per-channel variants say so."""
    from ptqflow.models.backends.base import UnsupportedVariant
    from ptqflow.models.backends.ort import check_opset
    from ptqflow.pipelines.variants.specs import VARIANTS

    with pytest.raises(UnsupportedVariant, match="per-channel weights need opset 13.*opset-11"):
        check_opset(onnx.load(str(mobilenet_opset11)), VARIANTS["ort-int8"].config)
    check_opset(onnx.load(str(mobilenet_opset11)), VARIANTS["ort-uint8"].config)  # per-tensor: fine at 11


@pytest.fixture(scope="module")
def mobilenet_v3(tmp_path_factory, cifar_dir):
    from exporter_fixture import mobilenet_v3_style

    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    return mobilenet_v3_style(tmp_path_factory.mktemp("mnv3") / "mobilenet_v3.onnx", train.images.astype(np.float32),
                              train.labels, classes=10)


def test_hardswish_written_as_mul_of_hardsigmoid_becomes_one_quantized_op(mobilenet_v3, tmp_path):
    """Below opset 14 exporters write HardSwish as x * HardSigmoid(x); onnx2torch computes HardSigmoid as a multiply,
    an add and a clip. FX quantized each of them with its own scale (28 quantized::mul in the issue's MobileNetV3);
    graph preparation now gives one Hardswish (and one Hardsigmoid per squeeze-excitation gate)."""
    import torch

    from ptqflow.models.graph.fx_prep import prepare_graph
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch
    from ptqflow.models.graph.rewrites import materialize_constants

    model = onnx.load(str(mobilenet_v3))
    hard_sigmoids = sum(node.op_type == "HardSigmoid" for node in model.graph.node)
    assert hard_sigmoids == 8  # 6 HardSwish (stem, 2 blocks x 2, head) and 2 squeeze-excitation gates
    module = import_onnx2torch().convert(materialize_constants(model)[0]).eval()
    example = torch.rand(4, 3, 32, 32)
    prepared = prepare_graph(module, example_input=example)
    kinds = [type(m).__name__ for m in prepared.modules()]
    assert kinds.count("Hardswish") == 6 and kinds.count("Hardsigmoid") == 2
    assert not any(kind.startswith("Onnx") for kind in kinds)
    muls = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target.__name__ == "mul"]
    assert len(muls) == 2  # the squeeze-excitation products only
    with torch.no_grad():
        assert torch.allclose(module(example), prepared(example), atol=1e-5)


def test_a_mobilenet_v3_style_model_sweeps_in_every_default_variant(mobilenet_v3, cifar_dir, tmp_path):
    results = quantize(mobilenet_v3, cifar_dir, track=False, output_dir=tmp_path, calibration_size=CALIBRATION_SIZE,
                       preprocessing="unit", adaround_iterations=ADAROUND_ITERATIONS, bench=False)
    assert results["fp32"].accuracy > 0.3
    for report in results:
        if report.name != "pytorch-fx-uint8":
            assert report.status == "ok" and report.agreement >= AGREEMENT_FLOOR, (report.name, report.reason)
    graph = str(__import__("torch").jit.load(str(results["pytorch-fx-int8-x86"].model_file)).inlined_graph)
    assert graph.count("quantized::hardswish") == 6 and graph.count("quantized::mul") <= 2


def test_torch_s_default_exporter_s_mobilenet_v3_sweeps_in_every_default_variant(cifar_dir, tmp_path):
    """`torch.onnx.export(model, args, path)` with no other argument uses the dynamo exporter since torch 2.9: opset
    20 here, a fixed batch of 1, HardSwish and HardSigmoid as single ops, ReduceMean with its axes as an input (opset
    18), allowzero on every Reshape. The same model and weights as the opset-13 fixture sweep alike."""
    from exporter_fixture import mobilenet_v3_style

    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    path = mobilenet_v3_style(tmp_path / "dynamo.onnx", train.images.astype(np.float32), train.labels, classes=10,
                              dynamo=True)
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 18
    ops = {node.op_type for node in model.graph.node}
    assert {"HardSwish", "HardSigmoid", "ReduceMean"} <= ops and "GlobalAveragePool" not in ops
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    results = quantize(path, cifar_dir, track=False, output_dir=tmp_path / "out", calibration_size=CALIBRATION_SIZE,
                       preprocessing="unit", adaround_iterations=ADAROUND_ITERATIONS, bench=False)
    assert results["fp32"].accuracy > 0.3
    for report in results:
        if report.name != "pytorch-fx-uint8":
            assert report.status == "ok" and report.agreement >= AGREEMENT_FLOOR, (report.name, report.reason)


def test_hard_activations_written_out_as_keras_and_pytorch_ports_write_them_become_one_quantized_op_each(
        cifar_dir, tmp_path):
    """Keras's MobileNetV3 writes hard_sigmoid as relu6(x + 3) * (1/6) and hard_swish as x * hard_sigmoid(x), and
    tf2onnx keeps them as Add, Clip and Mul; PyTorch ports often write x * relu6(x + 3) / 6. Graph preparation makes
    each one nn.Hardswish or nn.Hardsigmoid (the same 6 and 2 as the HardSigmoid-op export), exactly; the FX variants
    run each as one quantized op. Before, the oneDNN variant failed on it: its convolution-add fusion took the
    constant 3 for a residual tensor ("required rank 4 tensor to use channels_last format")."""
    import torch
    from exporter_fixture import mobilenet_v3_style

    from ptqflow.models.graph.fx_prep import prepare_graph
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch
    from ptqflow.models.graph.rewrites import materialize_constants
    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    path = mobilenet_v3_style(tmp_path / "decomposed.onnx", train.images.astype(np.float32), train.labels, classes=10,
                              decomposed=True)
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops and ops.count("Clip") == 10 and "Div" in ops  # 8 activations, 2 ReLU6
    module = import_onnx2torch().convert(materialize_constants(model)[0]).eval()
    example = torch.rand(4, 3, 32, 32)
    prepared = prepare_graph(module, example_input=example)
    kinds = [type(m).__name__ for m in prepared.modules()]
    assert kinds.count("Hardswish") == 6 and kinds.count("Hardsigmoid") == 2 and kinds.count("ReLU6") == 2
    with torch.no_grad():
        assert torch.allclose(module(example), prepared(example), atol=1e-5)

    # every layer in int8, so the counts do not depend on which kernels are slow on this CPU
    results = quantize(path, cifar_dir, FX_VARIANTS, track=False, output_dir=tmp_path / "out",
                       calibration_size=CALIBRATION_SIZE, preprocessing="unit", weight_rounding="nearest", bench=False,
                       speed_check=False)
    for name in FX_VARIANTS:
        report = results[name]
        assert report.status == "ok" and report.agreement >= AGREEMENT_FLOOR, (name, report.reason)
        graph = str(torch.jit.load(str(report.model_file)).inlined_graph)
        assert graph.count("quantized::hardswish") == 6 and graph.count("quantized::mul") <= 2, name


def test_a_layer_fx_cannot_trace_is_recorded_on_the_variant_run(plain_model, grey_data, tracking_store, monkeypatch):
    """Made untraceable here (no dtype known for Div), the layer runs in float and the run's tag says which and
    why."""
    from mlflow.tracking import MlflowClient

    from ptqflow.models.graph import fx_prep
    from ptqflow.tracking.keys import Tag

    monkeypatch.setattr(fx_prep, "_is_floating", lambda gm, arg: False)
    data, _ = grey_data
    results = quantize(plain_model, data, variants=["pytorch-fx-int8-x86"], calibration_size=CALIBRATION_SIZE,
                       weight_rounding="nearest", bench=False, diagnose=False, register=False)
    report = results["pytorch-fx-int8-x86"]
    assert report.status == "ok" and report.agreement >= AGREEMENT_FLOOR
    kept = MlflowClient().get_run(report.run_id).data.tags[Tag.KEPT_FLOAT]
    assert kept.startswith("Div: OnnxBinaryMathOperation: TraceError")


def test_a_recipe_that_keeps_layers_out_of_8_bits_is_not_a_fully_quantized_variant():
    """The int8 registry names take fully quantized variants only: a tune trial's upgraded layers (FP32 or 16 bits)
    count like a `-mixed` variant's (issue 25, '-mixed variants crowned as int8', as tune makes them)."""
    from dataclasses import replace

    from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS, VARIANTS

    assert not any(VARIANTS[name].keeps_layers_out_of_8_bits for name in DEFAULT_VARIANTS)
    ort, fx = VARIANTS["ort-int8"], VARIANTS["pytorch-fx-int8"]
    assert replace(ort, config=replace(ort.config, fp32_nodes=("conv_1",))).keeps_layers_out_of_8_bits
    assert replace(ort, config=replace(ort.config, activation_16bit_tensors=("x",))).keeps_layers_out_of_8_bits
    assert replace(fx, config=replace(fx.config, fp32_modules=("conv_1",))).keeps_layers_out_of_8_bits


def test_the_fx_diagnosis_maps_a_torch_export_s_layers(mobilenet_v3, cifar_dir, tracking_store):
    """torch's exporter names nodes '/stem/stem.0/Conv', onnx2torch names the module 'stem/stem/0/Conv': the layer map
    found none of them, and every layer read 'not quantized' with no SQNR. HardSwish's quantized kernel also stopped
    the shadow comparison."""
    import json

    from ptqflow.tracking import records

    results = quantize(mobilenet_v3, cifar_dir, variants=["pytorch-fx-int8-x86"], calibration_size=CALIBRATION_SIZE,
                       preprocessing="unit", adaround_iterations=ADAROUND_ITERATIONS, bench=False, register=False,
                       diagnose_images=32)
    layers = json.loads(records.download_text(results["pytorch-fx-int8-x86"].run_id, "diagnosis/layers.json"))["layers"]
    quantized = [row for row in layers if row["quantized"]]
    assert len(quantized) >= 12 and all(row["local_sqnr_db"] is not None for row in quantized)
    assert any(row["layer"].startswith("/stem/") for row in quantized)
    # the table says why each layer is in float: the recipe's float head here; every float row has a reason
    head = [row for row in layers if row["op_type"] == "Gemm"]
    assert head and not head[0]["quantized"] and "classifier head" in head[0]["float_reason"]
    assert all(row["float_reason"] for row in layers if not row["quantized"])
    assert not any(row["float_reason"] for row in quantized)


@pytest.fixture(scope="module")
def mobilenet_v2(tmp_path_factory, cifar_dir):
    from exporter_fixture import mobilenet_v2_style

    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    return mobilenet_v2_style(tmp_path_factory.mktemp("mnv2") / "mobilenet_v2.onnx", train.images.astype(np.float32),
                              train.labels, classes=10)


def test_a_mobilenet_v2_style_model_sweeps_and_keeps_adaround_only_where_held_out_images_say_so(
        mobilenet_v2, cifar_dir, tracking_store):
    """Inverted residuals with ReLU6 written as Clip: every default variant sweeps and reaches the floor; each
    AdaRound variant was compared with its nearest-rounded twin on training images outside the calibration set and
    kept the better (AdaRound never worse than nearest there, end to end); the int8 engines computed every layer as
    quantized (fbgemm's depthwise kernels no longer saturate)."""
    import json

    from mlflow.tracking import MlflowClient

    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Metric, Param, Tag

    assert onnx.load(str(mobilenet_v2)).opset_import[0].version == 12
    results = quantize(mobilenet_v2, cifar_dir, calibration_size=CALIBRATION_SIZE, preprocessing="unit",
                       adaround_iterations=ADAROUND_ITERATIONS, bench=False, diagnose=False, register=False)
    assert results["fp32"].accuracy > 0.3
    client = MlflowClient()
    compared = corrected = 0
    for report in results:
        if report.name in ("fp32", "pytorch-fx-uint8"):
            continue
        assert report.status == "ok" and report.agreement >= AGREEMENT_FLOOR, (report.name, report.agreement)
        run = client.get_run(report.run_id)
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert params[Param.VALIDATION_SIZE] == "100"  # the 100 training images the calibration set left
        assert Tag.ENGINE_DEPARTURES not in tags, tags[Tag.ENGINE_DEPARTURES]
        # torch's onednn patterns fuse an inverted residual's Add wrongly: left out, and the run says so
        assert (Tag.FUSION_FALLBACK in tags) is (report.name == "pytorch-fx-int8-onednn"), report.name
        if params[Param.WEIGHT_ROUNDING] == "adaround":
            kept = params[Param.WEIGHT_ROUNDING_KEPT]
            other = "nearest" if kept == "adaround" else "adaround"
            assert metrics[f"validation_agreement_{kept}"] >= metrics[f"validation_agreement_{other}"]
            assert Metric.VALIDATION_AGREEMENT_NEAREST in metrics and Tag.ROUNDING_CHOICE in tags
            compared += 1
            # AdaRound's weights come with their depthwise biases corrected; nearest-rounded ones have none
            assert (Param.BIAS_CORRECTED_CHANNELS in params) is (kept == "adaround")
            corrected += int(params.get(Param.BIAS_CORRECTED_CHANNELS, 0))
        # its pointwise -> depthwise -> pointwise chains (ReLU6 as Clip) were equalized, and each variant kept
        # equalization or not by the held-out rule, recorded with its numbers
        kept = params[Param.EQUALIZATION_KEPT]
        assert kept in ("on", "off") and Tag.EQUALIZATION_CHOICE in tags
        on, off = metrics[Metric.VALIDATION_AGREEMENT_EQUALIZED], metrics[Metric.VALIDATION_AGREEMENT_UNEQUALIZED]
        assert kept == "off" or on >= off
        assert f"equalization {kept}" in tags[Tag.EQUALIZATION_CHOICE]
        qconfig = json.loads(records.download_text(report.run_id, "qconfig.json"))
        assert qconfig["config"]["equalization"] is (kept == "on")  # the model file's recipe
    assert compared >= 3  # FX per-channel and the ONNX Runtime variants round with AdaRound by default
    assert corrected > 0
