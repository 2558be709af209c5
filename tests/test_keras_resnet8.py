"""The Keras HDF5 -> ONNX converter, against a numpy forward pass of the Keras model (BatchNorm unfused)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from http_fixture import LocalHttpServer
from ptqflow.common.errors import ModelError
from ptqflow.models.graph.keras_resnet8 import (INPUT_NAME, SOURCE_SHA256_KEY, convert_h5_to_onnx,
                                  recorded_source_sha256)

BN_EPSILON = 1e-3
SHARED = Path(__file__).resolve().parents[2] / "shared"


class _KerasModelBuilder:
    """Builds a Keras 2 functional `model_config` with Keras' automatic layer names (conv2d, conv2d_1, ...)."""

    def __init__(self) -> None:
        self.layers: list[dict] = []
        self.counts: dict[str, int] = {}

    def add(self, class_name: str, prefix: str, inputs: list[str], **config) -> str:
        count = self.counts.get(prefix, 0)
        self.counts[prefix] = count + 1
        name = prefix if count == 0 else f"{prefix}_{count}"
        self.layers.append({"class_name": class_name, "name": name, "config": {"name": name, **config},
                            "inbound_nodes": [[[i, 0, 0, {}] for i in inputs]] if inputs else []})
        return name

    def conv(self, x: str, filters: int, kernel: int, stride: int) -> str:
        return self.add("Conv2D", "conv2d", [x], filters=filters, kernel_size=[kernel, kernel],
                        strides=[stride, stride], padding="same", data_format="channels_last",
                        dilation_rate=[1, 1], groups=1, activation="linear", use_bias=True)

    def bn(self, x: str) -> str:
        return self.add("BatchNormalization", "batch_normalization", [x], axis=[3], epsilon=BN_EPSILON)

    def relu(self, x: str) -> str:
        return self.add("Activation", "activation", [x], activation="relu")


def resnet8_model_config() -> dict:
    """The MLPerf Tiny ResNet8 layer graph, in the layer order of its published Keras file."""
    b = _KerasModelBuilder()
    inputs = b.add("InputLayer", "input_1", [], batch_input_shape=[None, 32, 32, 3], dtype="float32")
    x = b.relu(b.bn(b.conv(inputs, 16, 3, 1)))
    y = b.relu(b.bn(b.conv(x, 16, 3, 1)))
    y = b.bn(b.conv(y, 16, 3, 1))
    x = b.relu(b.add("Add", "add", [x, y]))
    for filters in (32, 64):
        y = b.relu(b.bn(b.conv(x, filters, 3, 2)))
        y = b.conv(y, filters, 3, 1)
        shortcut = b.conv(x, filters, 1, 2)
        y = b.bn(y)
        x = b.relu(b.add("Add", "add", [shortcut, y]))
    x = b.add("AveragePooling2D", "average_pooling2d", [x], pool_size=[8, 8], strides=[8, 8], padding="valid",
              data_format="channels_last")
    x = b.add("Flatten", "flatten", [x], data_format="channels_last")
    x = b.add("Dense", "dense", [x], units=10, activation="softmax", use_bias=True)
    return {"class_name": "Functional",
            "config": {"name": "model", "layers": b.layers, "input_layers": [["input_1", 0, 0]],
                       "output_layers": [[x, 0, 0]]}}


def random_weights(model_config: dict, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Weights per layer, scaled so that raw 0..255 inputs give softmax outputs far from one-hot."""
    rng = np.random.default_rng(seed)
    weights, channels = {}, {}
    for layer in model_config["config"]["layers"]:
        name, config, kind = layer["name"], layer["config"], layer["class_name"]
        inputs = [inbound[0] for inbound in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        in_channels = channels[inputs[0]] if inputs else 3
        channels[name] = in_channels
        if kind == "Conv2D":
            shape = (*config["kernel_size"], in_channels, config["filters"])
            scale = 1 / np.sqrt(np.prod(shape[:3])) / (255 if in_channels == 3 else 1)
            weights[name] = {"kernel": rng.normal(0, scale, shape), "bias": rng.normal(0, 0.1, shape[-1])}
            channels[name] = config["filters"]
        elif kind == "BatchNormalization":
            n = in_channels
            weights[name] = {"gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.2, n),
                             "moving_mean": rng.normal(0, 0.2, n), "moving_variance": rng.uniform(0.5, 2.0, n)}
        elif kind == "Dense":
            shape = (in_channels, config["units"])
            weights[name] = {"kernel": rng.normal(0, 1 / np.sqrt(in_channels), shape),
                             "bias": rng.normal(0, 0.1, config["units"])}
    return {layer: {k: v.astype(np.float32) for k, v in w.items()} for layer, w in weights.items()}


def write_keras_h5(path: Path, model_config: dict, weights: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write an HDF5 file in the layout Keras 2.4 `model.save(...h5)` uses."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.4.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config)
        group = f.create_group("model_weights")
        names = [layer["name"] for layer in model_config["config"]["layers"]]
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            layer_group = group.create_group(name)
            layer_weights = weights.get(name, {})
            layer_group.attrs["weight_names"] = np.array([f"{name}/{k}:0".encode() for k in layer_weights])
            for key, value in layer_weights.items():
                layer_group.create_dataset(f"{name}/{key}:0", data=value)
    return path


def write_resnet8_h5(path: Path, seed: int = 0) -> Path:
    config = resnet8_model_config()
    return write_keras_h5(path, config, random_weights(config, seed))


def _conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """TensorFlow "same" convolution, NHWC, padding the odd extra row/column at the bottom/right."""
    k = kernel.shape[0]
    size = x.shape[1]
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    before = total // 2
    padded = np.pad(x, ((0, 0), (before, total - before), (before, total - before), (0, 0)))
    result = np.zeros((x.shape[0], out, out, kernel.shape[3]))
    for i in range(k):
        for j in range(k):
            window = padded[:, i:i + stride * out:stride, j:j + stride * out:stride, :]
            result += window @ kernel[i, j]
    return result + bias


def keras_resnet8_forward(weights: dict[str, dict[str, np.ndarray]], images_nhwc: np.ndarray) -> np.ndarray:
    """The Keras model's inference computation, layer by layer in float64, BatchNorm applied unfused."""
    w = {layer: {k: v.astype(np.float64) for k, v in ws.items()} for layer, ws in weights.items()}

    def conv(x, name, stride):
        return _conv_same(x, w[name]["kernel"], w[name]["bias"], stride)

    def bn(x, name):
        p = w[name]
        return (x - p["moving_mean"]) / np.sqrt(p["moving_variance"] + BN_EPSILON) * p["gamma"] + p["beta"]

    def relu(x):
        return np.maximum(x, 0)

    x = relu(bn(conv(images_nhwc.astype(np.float64), "conv2d", 1), "batch_normalization"))
    y = relu(bn(conv(x, "conv2d_1", 1), "batch_normalization_1"))
    x = relu(x + bn(conv(y, "conv2d_2", 1), "batch_normalization_2"))
    y = relu(bn(conv(x, "conv2d_3", 2), "batch_normalization_3"))
    x = relu(conv(x, "conv2d_5", 2) + bn(conv(y, "conv2d_4", 1), "batch_normalization_4"))
    y = relu(bn(conv(x, "conv2d_6", 2), "batch_normalization_5"))
    x = relu(conv(x, "conv2d_8", 2) + bn(conv(y, "conv2d_7", 1), "batch_normalization_6"))
    logits = x.mean(axis=(1, 2)) @ w["dense"]["kernel"] + w["dense"]["bias"]  # 8x8 average pool, flatten
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def run_onnx(path: Path, images_nhwc: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images_nhwc.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def random_images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(6, 32, 32, 3)).astype(np.float32)


def test_converted_model_matches_keras_forward(tmp_path, random_images):
    config = resnet8_model_config()
    weights = random_weights(config, seed=0)
    h5_path = write_keras_h5(tmp_path / "resnet8.h5", config, weights)

    onnx_path = convert_h5_to_onnx(h5_path, tmp_path / "out" / "resnet8.onnx")

    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert {n.op_type for n in model.graph.node} == {"Transpose", "Conv", "Relu", "Add", "AveragePool",
                                                     "Reshape", "MatMul", "Softmax"}  # BatchNorm folded
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 9
    assert recorded_source_sha256(onnx_path) == next(
        p.value for p in model.metadata_props if p.key == SOURCE_SHA256_KEY)

    for batch in (1, len(random_images)):
        probabilities = run_onnx(onnx_path, random_images[:batch])
        assert probabilities.shape == (batch, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    expected = keras_resnet8_forward(weights, random_images)
    assert expected.max() < 0.99  # not saturated, so the comparison below is meaningful
    np.testing.assert_allclose(run_onnx(onnx_path, random_images), expected, atol=1e-4, rtol=0)
    assert not list(onnx_path.parent.glob("*.tmp"))


def test_stride_two_same_padding_is_bottom_right(tmp_path):
    onnx_path = convert_h5_to_onnx(write_resnet8_h5(tmp_path / "m.h5"), tmp_path / "m.onnx")
    pads = {tuple(next(a.ints for a in n.attribute if a.name == "pads"))
            for n in onnx.load(onnx_path).graph.node if n.op_type == "Conv"}
    assert pads == {(1, 1, 1, 1), (0, 0, 1, 1), (0, 0, 0, 0)}


def _mutated(mutate) -> tuple[dict, dict]:
    config = resnet8_model_config()
    weights = random_weights(config, seed=0)
    mutate(config["config"]["layers"], weights)
    return config, weights


def _layer(layers: list[dict], name: str) -> dict:
    return next(layer for layer in layers if layer["name"] == name)


@pytest.mark.parametrize("mutate, message", [
    (lambda layers, w: _layer(layers, "activation").update(class_name="LeakyReLU"), "LeakyReLU"),
    (lambda layers, w: _layer(layers, "input_1")["config"].update(batch_input_shape=[None, 28, 28, 1]),
     "[None, 28, 28, 1]"),
    (lambda layers, w: w["conv2d_1"].update(kernel=np.zeros((5, 5, 16, 16), np.float32)), "kernel"),
    (lambda layers, w: _layer(layers, "dense")["config"].update(activation="sigmoid"), "sigmoid"),
    (lambda layers, w: _layer(layers, "conv2d_1")["config"].update(activation="relu"),
     "batch_normalization_1"),
    (lambda layers, w: _layer(layers, "conv2d")["config"].pop("filters"), "filters"),
], ids=["unsupported-layer", "input-shape", "kernel-shape", "output-activation", "unfoldable-bn",
        "config-missing-entry"])
def test_other_architecture_is_refused(tmp_path, mutate, message):
    h5_path = write_keras_h5(tmp_path / "other.h5", *_mutated(mutate))
    with pytest.raises(ModelError, match="not the MLPerf Tiny ResNet8") as caught:
        convert_h5_to_onnx(h5_path, tmp_path / "other.onnx")
    assert message in str(caught.value)
    assert not (tmp_path / "other.onnx").exists()


def test_non_keras_files_are_refused(tmp_path):
    not_hdf5 = tmp_path / "junk.h5"
    not_hdf5.write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelError, match="not a readable HDF5 file"):
        convert_h5_to_onnx(not_hdf5, tmp_path / "a.onnx")
    weights_only = tmp_path / "weights.h5"
    with h5py.File(weights_only, "w") as f:
        f.create_group("model_weights")
    with pytest.raises(ModelError, match="no model_config"):
        convert_h5_to_onnx(weights_only, tmp_path / "b.onnx")


def test_recorded_source_sha256_of_unreadable_file_is_none(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"\xff\x00 not protobuf")
    assert recorded_source_sha256(tmp_path / "broken.onnx") is None
    assert recorded_source_sha256(tmp_path / "missing.onnx") is None


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared (real model and data)")
def test_fetched_real_model_matches_reference_export(tmp_path):
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.pipelines.data.fetch import RESNET8_H5_SHA256, fetch_resnet8

    with LocalHttpServer() as server:
        server.files["/pretrainedResnet.h5"] = (SHARED / "models" / "mlperf_tiny_pretrainedResnet.h5").read_bytes()
        onnx_path = fetch_resnet8(tmp_path, url=server.url("/pretrainedResnet.h5"), sha256=RESNET8_H5_SHA256,
                                  progress=False)

    test_set = load_cifar10(SHARED / "data" / "cifar-10-batches-py").test
    images = test_set.images.transpose(0, 2, 3, 1).astype(np.float32)  # NCHW uint8 -> NHWC float32
    reference = ort.InferenceSession(str(SHARED / "models" / "resnet8.onnx"), providers=["CPUExecutionProvider"])
    converted = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batches = range(0, len(images), 1000)
    expected = np.concatenate([reference.run(None, {INPUT_NAME: images[i:i + 1000]})[0] for i in batches])
    actual = np.concatenate([converted.run(None, {INPUT_NAME: images[i:i + 1000]})[0] for i in batches])
    assert len(actual) == 10_000
    assert np.array_equal(actual.argmax(axis=1), expected.argmax(axis=1))
    assert np.abs(actual - expected).max() <= 1e-4
