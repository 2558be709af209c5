"""Graph rewrites before quantization (models/graph/rewrites.py) and what they guarantee downstream: BatchNorm folded
without changing the function, every node named so the float head is excluded by structure, and AdaRound's integers
surviving onnxruntime's quantization of a model that had BatchNorm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_fixture import batchnorm_cnn, pytorch_style_cnn, tiny_cnn

from ptqflow.models.graph.rewrites import fold_batch_norms, has_unnamed_nodes, name_unnamed_nodes

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _logits_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its Softmax removed, so comparisons see the logits rather than saturated probabilities."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    softmax = out.graph.node[-1]
    assert softmax.op_type == "Softmax"
    out.graph.output[0].name = softmax.input[0]
    out.graph.node.remove(softmax)
    return out


def _images(n: int, layout: str = "NCHW") -> np.ndarray:
    shape = (n, 3, 32, 32) if layout == "NCHW" else (n, 32, 32, 3)
    return RNG.uniform(0, 255, shape).astype(np.float32)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("build, expected", [
    (pytorch_style_cnn, 1),
    (lambda: batchnorm_cnn(conv_bias=False, depthwise=True), 2),
    (lambda: batchnorm_cnn(conv_bias=False, depthwise=False), 2),
    (lambda: batchnorm_cnn(conv_bias=True, depthwise=True), 2),
], ids=["pytorch_style", "no_bias_depthwise", "no_bias_dense", "bias_depthwise"])
def test_fold_batch_norms_preserves_the_function(build, expected):
    model = _logits_model(build())
    before = model.SerializeToString()
    folded, count = fold_batch_norms(model)
    assert count == expected
    assert "BatchNormalization" not in _ops(folded)
    assert _ops(folded).count("Conv") == _ops(model).count("Conv")
    assert model.SerializeToString() == before  # the input proto is left alone
    onnx.checker.check_model(folded, full_check=True)
    # the BatchNorm statistics are gone with it, not left behind as dead initializers
    assert not any(init.name.startswith("bn") for init in folded.graph.initializer)
    x = _images(8)
    reference, result = _run(model, x), _run(folded, x)
    np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_fold_batch_norms_leaves_other_batch_norms_alone():
    model = batchnorm_cnn(conv_bias=False, depthwise=True)
    # conv1's output read twice (also a graph output): its BatchNorm cannot disappear into it
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, ["N", 8, 32, 32]))
    # a BatchNorm after a Relu has no Conv to fold into
    relu2 = next(n for n in model.graph.node if n.op_type == "Relu" and n.output[0] == "r2")
    relu2.output[0] = "r2_pre"
    index = list(model.graph.node).index(relu2)
    model.graph.node.insert(index + 1, helper.make_node(
        "BatchNormalization", ["r2_pre", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["r2"]))
    onnx.checker.check_model(model)
    folded, count = fold_batch_norms(model)
    assert count == 1  # only the depthwise conv's
    assert _ops(folded).count("BatchNormalization") == 2
    # bn2's statistics are still read by the BatchNorm after the Relu, so they stay
    assert {"bn2_scale", "bn2_mean"} <= {init.name for init in folded.graph.initializer}
    x = _images(4)
    for reference, result in zip(_run_all(model, x), _run_all(folded, x)):
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _run_all(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_fold_batch_norms_copies_a_weight_shared_with_another_conv():
    model = batchnorm_cnn(conv_bias=False, depthwise=False)
    # a third conv reads w2 too, with no BatchNorm: its weights must stay as they are
    model.graph.node.insert(4, helper.make_node("Conv", ["r1", "w2"], ["c3"], kernel_shape=[3, 3],
                                                pads=[0, 0, 1, 1], strides=[2, 2]))
    model.graph.output.append(helper.make_tensor_value_info("c3", TensorProto.FLOAT, ["N", 8, 16, 16]))
    folded, count = fold_batch_norms(model)
    assert count == 2
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(after["w2"], original["w2"])
    x = _images(4)
    for reference, result in zip(_run_all(model, x), _run_all(folded, x)):
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = ""
    return model


def test_name_unnamed_nodes_is_unique_deterministic_and_keeps_names():
    model = _unnamed(tiny_cnn())
    model.graph.node[0].name = "Conv_1"  # the name node 1 (a Conv) would get
    named = name_unnamed_nodes(model)
    names = [node.name for node in named.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names[0] == "Conv_1" and names[1] != "Conv_1"
    assert names == [node.name for node in name_unnamed_nodes(model).graph.node]
    assert has_unnamed_nodes(model) and not has_unnamed_nodes(named)
    assert model.graph.node[1].name == ""  # the input proto is left alone


def test_head_detection_refuses_unnamed_nodes():
    from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes

    with pytest.raises(ValueError, match="unnamed"):
        onnx_classifier_head_nodes(_unnamed(tiny_cnn()))
    head = onnx_classifier_head_nodes(name_unnamed_nodes(_unnamed(tiny_cnn())))
    assert head and "" not in head


def _producers(model: onnx.ModelProto) -> dict:
    return {output: node for node in model.graph.node for output in node.output}


@pytest.mark.parametrize("quant_format, dtype, per_channel", [("QOperator", "uint8", False), ("QDQ", "int8", True)])
def test_unnamed_model_quantizes_every_conv_and_keeps_the_head_float(tmp_path, quant_format, dtype, per_channel):
    """Before the fix the head's empty names went into nodes_to_exclude and excluded every unnamed node."""
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.models.backends.ort import OrtStaticConfig, quantize

    path = tmp_path / "unnamed.onnx"
    onnx.save(_unnamed(tiny_cnn()), str(path))
    (tmp_path / "work").mkdir()
    config = OrtStaticConfig(quant_format=quant_format, activation_dtype=dtype, weight_dtype=dtype,
                             per_channel=per_channel)
    result = quantize(FloatModel(load_classifier(path), tmp_path / "work"), config, _images(64, "NHWC"),
                      tmp_path / "out")
    quantized = onnx.load(str(result.path))
    ops = _ops(quantized)
    producers = _producers(quantized)
    if quant_format == "QOperator":
        assert ops.count("QLinearConv") == 2 and "Conv" not in ops
    else:
        convs = [node for node in quantized.graph.node if node.op_type == "Conv"]
        assert len(convs) == 2
        for conv in convs:
            assert producers[conv.input[1]].op_type == "DequantizeLinear"
            assert producers[conv.input[0]].op_type == "DequantizeLinear"
    # the head (pool, MatMul+Add fused to Gemm, softmax) stays float, reading float tensors only
    assert not {"QGemm", "QLinearMatMul", "MatMulInteger", "QLinearAveragePool", "QLinearSoftmax"} & set(ops)
    (gemm,) = [node for node in quantized.graph.node if node.op_type in ("Gemm", "MatMul")]
    assert all(name not in producers or producers[name].op_type != "DequantizeLinear" for name in gemm.input)
    assert all(init.data_type == TensorProto.FLOAT for init in quantized.graph.initializer if init.name in gemm.input)


def test_for_quantization_folds_names_and_records(tmp_path):
    from ptqflow.common.files import file_sha256
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    path = tmp_path / "bn.onnx"
    onnx.save(batchnorm_cnn(), str(path))
    original = FloatModel(load_classifier(path), tmp_path / "work")
    ready = original.for_quantization()
    assert ready is not original and ready.folded_batch_norms == 2
    assert ready.onnx.path == tmp_path / "work" / "fp32-quantization" / "bn.onnx"
    assert ready.onnx.sha256 == file_sha256(ready.onnx.path) != original.onnx.sha256
    assert ready.onnx.size_bytes == ready.onnx.path.stat().st_size
    assert ready.onnx.input == original.onnx.input and ready.onnx.external_files == ()
    on_disk = onnx.load(str(ready.onnx.path))
    assert "BatchNormalization" not in _ops(on_disk) and not has_unnamed_nodes(on_disk)
    assert ready.for_quantization() is ready and ready.folded_batch_norms == 2
    assert original.onnx.path == path and "BatchNormalization" in _ops(original.onnx.proto)

    named = tmp_path / "named.onnx"
    onnx.save(name_unnamed_nodes(tiny_cnn()), str(named))
    plain = FloatModel(load_classifier(named), tmp_path / "work2")
    assert plain.for_quantization() is plain and plain.folded_batch_norms == 0


def test_adarounded_grid_survives_ort_quantization_of_a_batchnorm_model(tmp_path):
    """onnxruntime's pre-processing folds BatchNorm into the conv; after AdaRound that would move every weight off
    the grid. Folded first, the QLinearConv integers are exactly AdaRound's."""
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.models.backends.ort import OrtStaticConfig, quantize

    path = tmp_path / "bn.onnx"
    onnx.save(pytorch_style_cnn(), str(path))
    calibration = _images(64)
    ready = FloatModel(load_classifier(path), tmp_path / "work").for_quantization()
    assert ready.folded_batch_norms == 1
    rounded = ready.with_adarounded_weights("per_tensor_asym_uint8", calibration, "test-calibration", iterations=20)
    config = OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8", weight_dtype="uint8",
                             per_channel=False, speed_check=False)  # every convolution's integers are checked
    quantized = onnx.load(str(quantize(rounded, config, calibration, tmp_path / "out").path))
    floats = {init.name: numpy_helper.to_array(init) for init in rounded.onnx.proto.graph.initializer}
    inits = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    convs = [node for node in quantized.graph.node if node.op_type == "QLinearConv"]
    # matched by position: the graph keeps the convolutions' order
    float_convs = [node for node in rounded.onnx.proto.graph.node if node.op_type == "Conv"]
    assert len(convs) == len(float_convs) == 2
    for conv, float_conv in zip(convs, float_convs):
        weight, scale, zero_point = (inits[name] for name in conv.input[3:6])
        assert scale.size == 1 and weight.dtype == np.uint8
        dequantized = (weight.astype(np.float64) - zero_point.astype(np.float64)) * scale.astype(np.float64)
        np.testing.assert_allclose(dequantized, floats[float_conv.input[1]], rtol=0, atol=1e-4 * float(scale))


def _auto_pad_model(opset: int = 11) -> onnx.ModelProto:
    """Conv SAME_UPPER at stride 2, MaxPool SAME_LOWER, AveragePool SAME_UPPER and a VALID Conv, as Keras
    converters and older tf2onnx write them; on an 8x8 input the Conv's and the MaxPool's padding total an odd
    number of pixels, so begin and end differ (onnx2torch takes asymmetric pads for those, not for AveragePool)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 2, 2)).astype(np.float32), "W2")]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                         name="conv_same"),
        helper.make_node("MaxPool", ["c1"], ["m"], kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_LOWER",
                         name="max_same_lower"),
        helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], auto_pad="SAME_UPPER", name="avg_same"),
        helper.make_node("Conv", ["a", "W2"], ["y"], kernel_shape=[2, 2], auto_pad="VALID", name="conv_valid"),
    ]
    graph = helper.make_graph(nodes, "auto_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_auto_pad_becomes_the_pads_it_means_and_onnx2torch_converts_it():
    """onnx2torch implements no auto_pad ("SAME_UPPER auto_pad is not implemented"), so such a model stopped the
    whole sweep at its FP32 conversion; the explicit pads compute what onnxruntime computes with auto_pad."""
    import onnxruntime as ort
    import torch

    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch
    from ptqflow.models.graph.rewrites import explicit_pads

    model = _auto_pad_model()
    with pytest.raises(NotImplementedError):
        import_onnx2torch().convert(model)
    rewritten, count = explicit_pads(model)
    assert count == 4
    pads = {n.name: list(helper.get_attribute_value(a)) for n in rewritten.graph.node for a in n.attribute
            if a.name == "pads"}
    assert pads == {"conv_same": [0, 0, 1, 1], "max_same_lower": [1, 1, 0, 0], "avg_same": [1, 1, 1, 1],
                    "conv_valid": [0, 0, 0, 0]}
    assert not [a for n in rewritten.graph.node for a in n.attribute if a.name == "auto_pad"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    expected = run(model)
    np.testing.assert_allclose(run(rewritten), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        converted = import_onnx2torch().convert(rewritten).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(converted, expected, rtol=1e-4, atol=1e-4)
    assert explicit_pads(rewritten) == (rewritten, 0)  # nothing left to do: the same model back


def test_reshape_allowzero_goes_where_no_zero_can_reach_it():
    """The dynamo `torch.onnx.export` writes allowzero=1 on every Reshape, which onnx2torch refuses ('"allowzero=1"
    is not implemented'): it only changes what a 0 in the shape means, so a constant shape without one, or a shape
    computed from the input's sizes, loses it; a constant shape with a 0 keeps it."""
    import onnxruntime as ort
    import torch

    from ptqflow.models.graph.onnx2torch_import import convert, import_onnx2torch
    from ptqflow.models.graph.rewrites import reshapes_without_allowzero

    inits = [numpy_helper.from_array(np.array([-1, 48], np.int64), "flat"),
             numpy_helper.from_array(np.array([0, 48], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["a"], allowzero=1, name="constant_shape"),
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Concat", ["s", "minus_one"], ["computed"], axis=0),
        helper.make_node("Reshape", ["a", "computed"], ["y"], allowzero=1, name="computed_shape"),
        helper.make_node("Reshape", ["x", "zero"], ["z"], allowzero=1, name="zero_in_shape"),
    ]
    graph = helper.make_graph(nodes, "allowzero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    rewritten, count = reshapes_without_allowzero(model)
    assert count == 2
    allowzero = {n.name: helper.get_attribute_value(a) for n in rewritten.graph.node for a in n.attribute
                 if a.name == "allowzero"}
    assert allowzero == {"zero_in_shape": 1}
    with pytest.raises(NotImplementedError, match="allowzero"):
        import_onnx2torch().convert(model)
    for proto in (model, rewritten):
        del proto.graph.node[-1]  # a tensor of size 0 (onnxruntime refuses {2, 3, 4, 4} as {0, 48}): not a classifier
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    with torch.no_grad():
        converted = convert(rewritten).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(converted, expected)
    assert reshapes_without_allowzero(rewritten) == (rewritten, 0)


def _channel_constants_model() -> onnx.ModelProto:
    """conv1 -> Mul(per-channel (8,1,1)) -> Add(scalar) -> Relu -> conv2 -> Sub(c - x, (1,8,1,1)) -> Div(scalar)
    -> Relu; conv3 reads that, and its output is read twice (Mul by a constant and a residual Add), so its constant
    stays; a Div of a constant by conv4's output is not affine and stays too."""
    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    inits = [init("w1", RNG.normal(size=(8, 3, 3, 3)) * 0.1), init("b1", RNG.normal(size=8)),
             init("w2", RNG.normal(size=(8, 1, 3, 3))), init("w3", RNG.normal(size=(8, 8, 1, 1)) * 0.3),
             init("w4", RNG.normal(size=(8, 8, 1, 1)) * 0.3),
             init("scale", RNG.uniform(0.5, 2, size=(8, 1, 1))), init("shift", 3.0),
             init("minuend", RNG.normal(size=(1, 8, 1, 1))), init("divisor", [[[[4.0]]]]), init("gain", 0.5),
             init("numerator", 2.0)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Mul", ["c1", "scale"], ["m1"], name="mul1"),
             helper.make_node("Add", ["shift", "m1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="conv2"),
             helper.make_node("Sub", ["minuend", "c2"], ["s2"], name="sub2"),
             helper.make_node("Div", ["s2", "divisor"], ["d2"], name="div2"),
             helper.make_node("Relu", ["d2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
             helper.make_node("Mul", ["c3", "gain"], ["g3"], name="mul3"),
             helper.make_node("Add", ["g3", "c3"], ["a3"], name="residual"),
             helper.make_node("Conv", ["a3", "w4"], ["c4"], name="conv4"),
             helper.make_node("Div", ["numerator", "c4"], ["y"], name="inverse")]
    graph = helper.make_graph(nodes, "channel_constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                          ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_constants_a_conv_s_output_is_scaled_or_shifted_by_fold_into_it(tmp_path):
    """Mul, Add, Sub (either order) and Div by a constant with one value per channel, or one for all, after a Conv
    that nothing else reads fold into it, chains included; the model computes the same. A Conv whose output is also
    read elsewhere, and c / conv, stay. for_quantization records how many folded."""
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    model = _channel_constants_model()
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "constants.onnx"
    onnx.save(model, str(path))
    prepared = FloatModel(load_classifier(path), tmp_path / "work").for_quantization()
    assert prepared.folded_channel_constants == 4 and prepared.folded_batch_norms == 0
    folded = prepared.onnx.proto
    ops = _ops(folded)
    assert ops == ["Conv", "Relu", "Conv", "Relu", "Conv", "Mul", "Add", "Conv", "Div"]
    assert not any("_as_bn_" in init.name for init in folded.graph.initializer)  # folded, not left as BatchNorms
    x = _images(4)[:, :, :16, :16]
    reference, result = _run(model, x), _run(folded, x)
    np.testing.assert_allclose(result, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_the_onednn_variant_quantizes_a_conv_followed_by_an_added_constant(tmp_path, cifar_dir):
    """conv -> Add(constant) -> Relu: oneDNN's convolution-add-ReLU fusion took the constant for a residual tensor
    and the variant failed ("required rank 4 tensor to use channels_last format"); folded into the Conv's bias
    first, it quantizes, and the sweep's input to quantization holds no Add."""
    from onnx_fixture import fit_dense_head

    from ptqflow import quantize
    from ptqflow.pipelines.data.cifar import load_cifar10

    model = tiny_cnn()
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    conv.output[0] = "c1_raw"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.25, dtype=np.float32), "offset"))
    index = list(model.graph.node).index(conv)
    model.graph.node.insert(index + 1, helper.make_node("Add", ["c1_raw", "offset"], ["c1"], name="offset_add"))
    train = load_cifar10(cifar_dir).train
    model = fit_dense_head(model, train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels)
    path = tmp_path / "offset.onnx"
    onnx.save(model, str(path))
    results = quantize(path, cifar_dir, ["pytorch-fx-int8-onednn"], track=False, output_dir=tmp_path / "out",
                       calibration_size=64, weight_rounding="nearest", bench=False)
    report = results["pytorch-fx-int8-onednn"]
    assert report.status == "ok" and report.agreement >= 0.9, report.reason
