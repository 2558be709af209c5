"""Small ONNX CNNs built in the test, shaped like the MLPerf Tiny ResNet8 export (tf2onnx): NHWC float input of raw
0..255 pixels, a Transpose to NCHW, Conv/Relu with a stride-2 asymmetric pad, AveragePool, Reshape, MatMul + Add and
Softmax. tiny_cnn takes any image size, 1 or 3 channels and any class count (default: 32x32 RGB, 10 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def tiny_cnn(layout: str = "NHWC", batch: int | None = None, seed: int = 0, input_shape=None, channels: int = 3,
             size: int | tuple[int, int] = 32, classes: int = 10, global_pool: bool = False) -> onnx.ModelProto:
    """size: H (square) or (H, W); global_pool: GlobalAveragePool instead of a fixed-size AveragePool, so the
    model also runs at sizes other than the one declared (declare them dynamic with input_shape)."""
    rng = np.random.default_rng(seed)
    n = batch if batch is not None else "N"
    h, w = (size, size) if isinstance(size, int) else size
    shape = input_shape or ([n, h, w, channels] if layout == "NHWC" else [n, channels, h, w])
    pooled = ((h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1)  # after the stride-2 conv with its end pad of 1
    nodes, inits = [], []
    x = "input_1:0"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["x_nchw"], perm=[0, 3, 1, 2]))
        x = "x_nchw"
    # Weights scaled for raw 0..255 inputs so activations stay in a sane range.
    inits += [_init("w1", rng.normal(0, 1 / (9 * channels * 255) ** 0.5 * 4, (8, channels, 3, 3)).astype(np.float32)),
              _init("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
              _init("w2", rng.normal(0, (2 / 72) ** 0.5, (16, 8, 3, 3)).astype(np.float32)),
              _init("b2", rng.normal(0, 0.1, 16).astype(np.float32)),
              _init("wd", rng.normal(0, (2 / 16) ** 0.5, (16, classes)).astype(np.float32)),
              _init("bd", rng.normal(0, 0.1, classes).astype(np.float32)),
              _init("flat_shape", np.array([-1, 16], dtype=np.int64))]
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]) if global_pool else
        helper.make_node("AveragePool", ["r2"], ["pool"], kernel_shape=list(pooled), strides=list(pooled)),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wd"], ["logits_mm"]),
        helper.make_node("Add", ["logits_mm", "bd"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["Identity:0"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "tiny_cnn", [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, [n, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ptqflow-tests")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def write_tiny_cnn(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_cnn(**kwargs), str(path))
    return path


def fit_dense_head(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> onnx.ModelProto:
    """Least-squares fit of the MatMul/Add head on the frozen conv features, so the tiny CNN really classifies
    the fixture images (a model that predicts one class makes agreement and accuracy checks vacuous)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["flat"], {"input_1:0": images})[0].astype(np.float64)
    design = np.hstack([features, np.ones((len(features), 1))])
    classes = next(numpy_helper.to_array(i).shape[1] for i in model.graph.initializer if i.name == "wd")
    targets = np.eye(classes)[labels] * 8.0 - 4.0  # logits: +4 for the true class, -4 otherwise
    solution = np.linalg.lstsq(design.T @ design + 1e-3 * np.eye(design.shape[1]), design.T @ targets, rcond=None)[0]
    fitted = onnx.ModelProto()
    fitted.CopyFrom(model)
    for init in fitted.graph.initializer:
        if init.name == "wd":
            init.CopyFrom(_init("wd", solution[:-1].astype(np.float32)))
        elif init.name == "bd":
            init.CopyFrom(_init("bd", solution[-1].astype(np.float32)))
    onnx.checker.check_model(fitted)
    return fitted


def pytorch_style_cnn(seed: int = 0) -> onnx.ModelProto:
    """Shaped like a torch.onnx export: NCHW input, Conv + BatchNormalization, a stride-2 conv whose asymmetric
    Pad amounts are computed from Shape ops, GlobalAveragePool, Flatten and Gemm (transB)."""
    rng = np.random.default_rng(seed)
    n = "N"
    inits = [
        _init("w1", rng.normal(0, 0.02, (8, 3, 3, 3)).astype(np.float32)),
        _init("bn_scale", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
        _init("bn_bias", rng.normal(0, 0.1, 8).astype(np.float32)),
        _init("bn_mean", rng.normal(0, 1.0, 8).astype(np.float32)),
        _init("bn_var", rng.uniform(0.5, 2.0, 8).astype(np.float32)),
        _init("w2", rng.normal(0, (2 / 72) ** 0.5, (16, 8, 3, 3)).astype(np.float32)),
        _init("b2", rng.normal(0, 0.1, 16).astype(np.float32)),
        _init("wd", rng.normal(0, (2 / 16) ** 0.5, (10, 16)).astype(np.float32)),
        _init("bd", rng.normal(0, 0.1, 10).astype(np.float32)),
        _init("i2", np.array(2, np.int64)), _init("h_target", np.array(33, np.int64)),
        _init("ax0", np.array([0], np.int64)), _init("zeros6", np.zeros(6, np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        # end pad = 33 - H (1 for 32x32), the way TF-style "same" padding is exported from PyTorch
        helper.make_node("Shape", ["r1"], ["s"]),
        helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
        helper.make_node("Sub", ["h_target", "h"], ["e"]),
        helper.make_node("Unsqueeze", ["e", "ax0"], ["e1"]),
        helper.make_node("Concat", ["zeros6", "e1", "e1"], ["pads"], axis=0),
        helper.make_node("Pad", ["r1", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "pytorch_style_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [n, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="pytorch-style")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def batchnorm_cnn(conv_bias: bool = False, depthwise: bool = True, seed: int = 0) -> onnx.ModelProto:
    """NCHW like a torch.onnx export of Conv2d(bias=False) + BatchNorm2d(eps=1e-3): a Conv without (or with) bias
    followed by BatchNormalization, then a depthwise (group = channels) or ordinary stride-2 Conv followed by
    BatchNormalization, GlobalAveragePool, Flatten, Gemm and Softmax. The statistics are far from identity, so a
    wrong fold shows in the outputs."""
    rng = np.random.default_rng(seed)
    n = "N"

    def bn_params(prefix: str, channels: int) -> list:
        return [_init(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
                _init(f"{prefix}_bias", rng.normal(0, 0.2, channels).astype(np.float32)),
                _init(f"{prefix}_mean", rng.normal(0, 3.0, channels).astype(np.float32)),
                _init(f"{prefix}_var", rng.uniform(0.5, 4.0, channels).astype(np.float32))]

    w2_shape = (8, 1, 3, 3) if depthwise else (8, 8, 3, 3)
    inits = [_init("w1", rng.normal(0, 0.02, (8, 3, 3, 3)).astype(np.float32)), *bn_params("bn1", 8),
             _init("w2", rng.normal(0, (2 / (9 * w2_shape[1])) ** 0.5, w2_shape).astype(np.float32)),
             *bn_params("bn2", 8),
             _init("wd", rng.normal(0, 0.5, (10, 8)).astype(np.float32)),
             _init("bd", rng.normal(0, 0.1, 10).astype(np.float32))]
    conv1_inputs, conv2_inputs = ["x", "w1"], ["r1", "w2"]
    if conv_bias:
        inits += [_init("b1", rng.normal(0, 0.5, 8).astype(np.float32)),
                  _init("b2", rng.normal(0, 0.5, 8).astype(np.float32))]
        conv1_inputs.append("b1")
        conv2_inputs.append("b2")
    nodes = [
        helper.make_node("Conv", conv1_inputs, ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["bn1"],
                         epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", conv2_inputs, ["c2"], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2],
                         group=8 if depthwise else 1),
        helper.make_node("BatchNormalization", ["c2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["bn2"]),
        helper.make_node("Relu", ["bn2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "batchnorm_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [n, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="pytorch-style")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


# The outlier-channel CNN of issue 11 (tests/test_diagnosis.py, tests/test_fallback.py).
OUTLIER_CHANNEL = 3
FACTOR = 64.0
WIDTH = 8


def outlier_cnn(outlier: bool, seed: int = 0) -> onnx.ModelProto:
    """NHWC raw pixels -> Transpose -> conv1 (3->8) -> Relu -> conv2 (8->8, stride 2) -> Relu -> AveragePool 2x2 ->
    Flatten -> Gemm (512->10) -> Softmax. With `outlier`, conv1's output channel 3 (weights and bias) is x64 and
    conv2's input channel 3 is x1/64: the same function, one activation channel 64 times wider."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (WIDTH, 3, 3, 3))
    w1 *= 0.01 / np.abs(w1).reshape(WIDTH, -1).max(axis=1)[:, None, None, None]
    b1 = rng.normal(0, 0.2, WIDTH)
    w2 = rng.normal(0, 1, (WIDTH, WIDTH, 3, 3))
    w2 *= 0.3 / np.abs(w2).swapaxes(0, 1).reshape(WIDTH, -1).max(axis=1)[None, :, None, None]
    b2 = rng.normal(0, 0.1, WIDTH)
    wd = rng.normal(0, 1, (10, WIDTH * 8 * 8)) / np.sqrt(WIDTH * 64)
    if outlier:
        w1[OUTLIER_CHANNEL] *= FACTOR
        b1[OUTLIER_CHANNEL] *= FACTOR
        w2[:, OUTLIER_CHANNEL] /= FACTOR
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("wd", wd), ("bd", np.zeros(10)))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                         name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("AveragePool", ["r2"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], transB=1, name="dense"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(nodes, "outlier_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ptqflow-tests")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model
