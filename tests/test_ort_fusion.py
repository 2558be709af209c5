"""The sweep's ONNX Runtime int8 variants run every convolution as an int8 kernel, also where a residual branch
shares a tensor: with int8 activations onnxruntime's x86 rewrite to uint8 skips shared Q/DQ pairs and leaves those
convolutions in float between Q and DQ (issue 13: ort-int8 at 0.45-0.6x FP32)."""

from __future__ import annotations

import collections
import dataclasses
import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqflow.models.backends.base import FloatModel
from ptqflow.models.graph.onnx_model import load_classifier
from ptqflow.models.backends.ort import quantize
from ptqflow.pipelines.variants.specs import VARIANTS


def _residual_cnn() -> onnx.ModelProto:
    """NHWC input, conv -> relu feeding both the next conv and the residual Add, then a float head."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3), 0.01), init("b1", (8,), 0.1), init("w2", (8, 8, 3, 3), 0.15),
             init("b2", (8,), 0.1), init("w3", (16, 8, 3, 3), 0.15), init("b3", (16,), 0.1),
             init("wd", (16, 10), 0.3), init("bd", (10,), 0.1),
             numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "flat_shape")]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv),
             helper.make_node("Add", ["r1", "c2"], ["sum"], name="residual"),  # r1 has two readers
             helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", **conv),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["pool"], name="pool"),
             helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "wd"], ["mm"], name="dense"),
             helper.make_node("Add", ["mm", "bd"], ["logits"], name="dense_bias"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 16, 16, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _executed_ops(path, scratch) -> collections.Counter:
    """Op types of the graph onnxruntime runs, after its optimizations (default level, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def _quantized(tmp_path, config, name):
    path = tmp_path / "residual.onnx"
    onnx.save(_residual_cnn(), str(path))
    images = np.random.default_rng(1).uniform(0, 255, (40, 16, 16, 3)).astype(np.float32)
    return quantize(FloatModel(load_classifier(path), tmp_path / "work"), config, images, tmp_path / name).path


@pytest.mark.parametrize("variant", ["ort-int8", "ort-int8-u8s8"])
def test_every_convolution_runs_as_an_int8_kernel(tmp_path, variant):
    # every convolution in int8 (the speed check could keep the 3-channel stem in FP32 on this CPU)
    config = dataclasses.replace(VARIANTS[variant].config, weight_rounding="nearest", speed_check=False)
    ops = _executed_ops(_quantized(tmp_path, config, variant), tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="onnxruntime's x86 kernels only")
def test_int8_activations_leave_shared_convolutions_in_float_on_x86(tmp_path):
    """Why ort-int8 has uint8 activations: the same model with int8 activations keeps float convolutions."""
    config = dataclasses.replace(VARIANTS["ort-int8"].config, activation_dtype="int8", weight_rounding="nearest")
    ops = _executed_ops(_quantized(tmp_path, config, "s8s8"), tmp_path)
    assert ops["Conv"] >= 1, ops


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every node, tensor and initializer renamed (and the initializers stored in reverse)."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    graph = renamed.graph
    keep = {v.name for v in list(graph.input) + list(graph.output)}
    new = {}
    for tensor in graph.initializer:
        new[tensor.name] = f"const_{len(new)}"
    for node in graph.node:
        node.name = f"n{len(new)}"
        for name in node.output:
            new.setdefault(name, name if name in keep else f"t{len(new)}")
    for tensor in graph.initializer:
        tensor.name = new[tensor.name]
    for node in graph.node:
        node.input[:] = [new.get(name, name) for name in node.input]
        node.output[:] = [new.get(name, name) for name in node.output]
    initializers = list(graph.initializer)[::-1]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return renamed


def test_graph_digest_sees_what_is_computed_not_the_names():
    from ptqflow.models.graph.onnx_model import graph_digest

    model = _residual_cnn()
    assert graph_digest(_renamed(model)) == graph_digest(model)

    other_weight = onnx.ModelProto()
    other_weight.CopyFrom(model)
    w2 = next(t for t in other_weight.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(w2).copy()
    values.flat[0] += 1e-3
    w2.CopyFrom(numpy_helper.from_array(values, "w2"))
    other_pads = onnx.ModelProto()
    other_pads.CopyFrom(model)
    conv3 = next(n for n in other_pads.graph.node if n.name == "conv3")
    next(a for a in conv3.attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
    other_wiring = onnx.ModelProto()
    other_wiring.CopyFrom(model)
    next(n for n in other_wiring.graph.node if n.name == "relu2").input[:] = ["c2"]  # skips the residual Add
    digests = {graph_digest(m) for m in (model, other_weight, other_pads, other_wiring)}
    assert len(digests) == 4


def test_graph_digest_does_not_depend_on_the_order_of_independent_nodes():
    """onnxruntime stores the branches of a residual block in either order (ort-int8 and ort-int8-u8s8 on ResNet8)."""
    from ptqflow.models.graph.onnx_model import graph_digest

    def branches(first: str):
        nodes = {"relu": helper.make_node("Relu", ["x"], ["a"], name="relu"),
                 "neg": helper.make_node("Neg", ["x"], ["b"], name="neg")}
        order = [nodes[first], *(node for name, node in nodes.items() if name != first)]
        graph = helper.make_graph(order + [helper.make_node("Sub", ["a", "b"], ["y"], name="sub")], "branches",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    assert graph_digest(branches("relu")) == graph_digest(branches("neg"))
    swapped = branches("relu")
    swapped.graph.node[2].input[:] = ["b", "a"]  # Sub is not symmetric: another function
    assert graph_digest(swapped) != graph_digest(branches("relu"))


def test_graph_digest_sees_values_a_subgraph_reads_from_the_outer_scope():
    """An If branch that adds an initializer of the enclosing graph: its value is not among the If node's inputs."""
    from ptqflow.models.graph.onnx_model import graph_digest

    def model(offset: float):
        branch = lambda name, op: helper.make_graph(  # noqa: E731
            [helper.make_node(op, ["x", "w"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2])])
        node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Add"),
                                else_branch=branch("else", "Sub"))
        graph = helper.make_graph([node], "outer", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                                    helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                                  [numpy_helper.from_array(np.array([1.0, offset], np.float32), "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    onnx.checker.check_model(model(2.0))
    assert graph_digest(model(2.0)) == graph_digest(model(2.0))
    assert graph_digest(model(2.0)) != graph_digest(model(3.0))


def test_graph_digest_sees_the_body_of_a_model_local_function():
    from ptqflow.models.graph.onnx_model import graph_digest

    def model(op: str):
        function = helper.make_function("local", "Act", ["a"], ["b"], [helper.make_node(op, ["a"], ["b"])],
                                        [helper.make_opsetid("", 13)])
        graph = helper.make_graph([helper.make_node("Act", ["x"], ["y"], domain="local")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(graph, functions=[function],
                                 opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])

    onnx.checker.check_model(model("Relu"))
    assert graph_digest(model("Relu")) == graph_digest(model("Relu"))
    assert graph_digest(model("Relu")) != graph_digest(model("Neg"))


def test_qdq_and_qoperator_int8_files_run_as_one_graph_and_give_the_same_scores(tmp_path):
    """Why the sweep evaluates ort-int8-u8s8 once only when its graph is ort-int8's: onnxruntime fuses the QDQ file
    into the QOperator file's graph; ort-uint8 (other weights) is another graph."""
    from ptqflow.models.graph.onnx_model import graph_digest
    from ptqflow.models.runtime.runners import OrtRunner

    images = np.random.default_rng(2).uniform(0, 255, (64, 16, 16, 3)).astype(np.float32)
    digests, scores = {}, {}
    for variant in ("ort-int8", "ort-int8-u8s8", "ort-uint8"):
        config = dataclasses.replace(VARIANTS[variant].config, weight_rounding="nearest")
        optimized = tmp_path / f"{variant}-optimized.onnx"
        runner = OrtRunner(_quantized(tmp_path, config, variant), optimized_copy=optimized)
        digests[variant] = graph_digest(onnx.load(str(optimized)))
        scores[variant] = runner.predict(images)
    assert digests["ort-int8"] == digests["ort-int8-u8s8"] != digests["ort-uint8"]
    assert np.array_equal(scores["ort-int8"], scores["ort-int8-u8s8"])
