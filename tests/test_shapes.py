"""Model inputs of any shape (issue 12, section 2): size, 1 or 3 channels, NHWC or NCHW read from the model, dynamic
sizes with --input-size, --resize, per-channel mean/std, and the class count, through the whole sweep, the registry
and `ptqflow pull --evaluate`. Each mismatch is one line before any run starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cifar_fixture import gray_dataset, write_image_folder, write_npz
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, all_runs, runs_by_name
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper
from onnx_fixture import fit_dense_head, tiny_cnn
from typer.testing import CliRunner

from ptqflow.models.graph.onnx_model import NCHW, NHWC, output_width, read_input_spec
from ptqflow.pipelines.shared.choices import LayoutChoice, Preprocessing
from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.data.dataset import Dataset, Split
from ptqflow.pipelines.data.datasets import load_dataset, resize_images
from ptqflow.common.errors import ConfigError, DataError, ModelError
from ptqflow.pipelines.data.preprocessing import InputTransform
from ptqflow.pipelines.data.shapes import resolve_model_input
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS
from ptqflow.tracking.keys import Param, Tag, VersionTag

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _spec(shape):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return read_input_spec(helper.make_model(graph), Path("m.onnx"))


@pytest.mark.parametrize("shape,layout,hwc", [
    (["N", 32, 32, 3], NHWC, (32, 32, 3)),
    (["N", 3, 32, 32], NCHW, (32, 32, 3)),
    (["N", 48, 40, 1], NHWC, (48, 40, 1)),
    (["N", 1, 48, 40], NCHW, (48, 40, 1)),
    (["N", 3, "h", "w"], NCHW, (None, None, 3)),
    (["N", "h", "w", 1], NHWC, (None, None, 1)),
    ([1, 3, 3, 3], None, None),  # both could be channels
    (["N", "c", "h", "w"], None, None),  # nothing fixed
])
def test_layout_size_and_channels_are_read_from_the_input_shape(shape, layout, hwc):
    spec = _spec(shape)
    assert spec.layout == layout
    if layout is not None:
        assert (spec.height, spec.width, spec.channels) == hwc
    assert spec.with_layout(NCHW).channels == spec.dims[0]


@pytest.mark.parametrize("shape,fragment", [(["N", 28, 28, 2], "1 or 3 channels"), (["N", 28, 28], "rank 3"),
                                            (["N", 4, 32, 32], "1 or 3 channels")])
def test_inputs_that_are_no_image_batch_are_model_errors(shape, fragment):
    with pytest.raises(ModelError, match=fragment):
        _spec(shape)


def test_output_width_is_read_from_the_declared_shape():
    assert output_width(tiny_cnn(classes=7)) == 7
    dynamic = tiny_cnn()
    dynamic.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "K"
    assert output_width(dynamic) is None


def _data(channels=3, size=(32, 32), classes=2) -> Dataset:
    images = np.zeros((classes, channels, *size), np.uint8)
    split = Split(images, np.arange(classes))
    return Dataset(split, split, tuple(f"c{i}" for i in range(classes)), "0" * 64, Path("d"), "npz")


def test_resolving_the_model_input_against_the_data():
    fixed = _spec(["N", 1, 48, 48])
    with pytest.raises(DataError, match="1-channel images .* have 3-channel images"):
        resolve_model_input(fixed, _data(3, (48, 48)))
    with pytest.raises(ConfigError, match="images are 32x32 but the model takes 48x48; pass --resize"):
        resolve_model_input(fixed, _data(1, (32, 32)))
    resized = resolve_model_input(fixed, _data(1, (32, 32)), resize=True)
    assert resized.resized and resized.resize_text == "bilinear from 32x32" and resized.size == (48, 48)
    assert resized.fit(_data(1, (32, 32)).test).images.shape == (2, 1, 48, 48)
    with pytest.raises(ConfigError, match="--input-size 40x40 contradicts the model's fixed 48x48"):
        resolve_model_input(fixed, _data(1, (48, 48)), input_size=(40, 40))
    dynamic = _spec(["N", "h", "w", 3])
    with pytest.raises(ConfigError, match=r"no fixed height and width; pass --input-size HxW \(the d images are "
                                          r"20x30\)"):
        resolve_model_input(dynamic, _data(3, (20, 30)))
    assert resolve_model_input(dynamic, _data(3, (20, 30)), input_size=(20, 30)).size == (20, 30)
    ambiguous = _spec(["N", 3, 30, 3])
    with pytest.raises(ConfigError, match="pass --input-layout NHWC or --input-layout NCHW"):
        resolve_model_input(ambiguous, _data(3, (30, 3)))
    chosen = resolve_model_input(ambiguous, _data(3, (30, 3)), LayoutChoice.nchw)
    assert (chosen.layout, chosen.channels, chosen.size) == (NCHW, 3, (30, 3))
    with pytest.raises(ConfigError, match="contradicts the model, whose input is NHWC"):
        resolve_model_input(dynamic, _data(3, (20, 30)), LayoutChoice.nchw, input_size=(20, 30))


def test_mean_and_std_apply_after_the_scaling_per_channel():
    images = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    out = InputTransform(NCHW, Preprocessing.unit, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))(images)
    expected = (images / 255.0 - np.array([0.5, 0.25, 0.0])[:, None, None]) / np.array([0.5, 0.25, 2.0])[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="--mean and --std go together"):
        InputTransform(NCHW, mean=(0.5,))
    with pytest.raises(ConfigError, match="positive"):
        InputTransform(NCHW, mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError, match="standardize's CIFAR-10 mean/std gives 3 values .* 1 channel"):
        InputTransform(NCHW, Preprocessing.standardize).check_channels(1)


# ---- a 48x48 greyscale 7-class model through the whole sweep, the registry and pull --evaluate --------------------
@pytest.fixture(scope="module")
def gray7(tmp_path_factory):
    """A 48x48 greyscale, 7-class image folder (val/ split) and a tiny NHWC CNN fitted to it."""
    root = tmp_path_factory.mktemp("gray7")
    train, test, names = gray_dataset(classes=7, size=(48, 48))
    data_dir = write_image_folder(root / "shapes7", train, test, names, test_dir="val")
    model = fit_dense_head(tiny_cnn(channels=1, size=48, classes=7, seed=3),
                           train[0].transpose(0, 2, 3, 1).astype(np.float32), train[1])
    onnx.save(model, str(root / "gray7.onnx"))
    return root / "gray7.onnx", data_dir


def _onnxruntime_accuracy(model_path, images_nchw, labels, layout) -> float:
    import onnxruntime as ort

    x = images_nchw.astype(np.float32)
    x = x.transpose(0, 2, 3, 1) if layout == NHWC else x
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == labels).mean())


def test_greyscale_48x48_seven_class_model_sweeps_registers_and_pulls(tracking_store, gray7):
    model, data_dir = gray7
    result = run_sweep(SweepOptions(model_path=model, data_dir=data_dir, calibration_size=CALIBRATION_SIZE,
                                    bench=False, adaround_iterations=ADAROUND_ITERATIONS))
    statuses = {o.name: o.status for o in result.outcomes}
    assert statuses == {"fp32": "ok", **{v: "unsupported" if v == "pytorch-fx-uint8" else "ok"
                                         for v in DEFAULT_VARIANTS}}
    data = load_dataset(data_dir)
    fp32 = result.outcomes[0].evaluation
    assert fp32.accuracy == pytest.approx(_onnxruntime_accuracy(model, data.test.images, data.test.labels, NHWC))
    assert 0.5 < fp32.accuracy and set(fp32.per_class_accuracy) == set(data.class_names)
    for outcome in result.outcomes[1:]:
        if outcome.status == "ok":
            assert outcome.fidelity.top1_agreement >= 0.9, outcome.name
    runs = runs_by_name()
    for name in ("fp32", "pytorch-fx-int8", "ort-int8"):
        params = runs[name].data.params
        assert params[Param.NUM_CLASSES] == "7" and params[Param.INPUT_SIZE] == "48x48"
        assert params[Param.INPUT_CHANNELS] == "1" and params[Param.DATA_FORMAT] == "imagefolder"
        assert params[Param.RESIZE] == "none" and params[Param.INPUT_LAYOUT] == NHWC
        assert Tag.CALIBRATION_SHORTFALL not in runs[name].data.tags
    assert sorted(v.name for v in result.registered) == ["gray7-int8", "gray7-int8-onnx"]
    client = MlflowClient()
    tags = client.get_model_version("gray7-int8", "1").tags
    # Only what differs from the default: the format; the size is the FP32 model's own (no resizing, no tag).
    assert tags[VersionTag.DATA_FORMAT] == "imagefolder" and VersionTag.INPUT_SIZE not in tags
    assert "shapes7 classifier, NHWC 48x48x1" in client.get_registered_model("gray7-int8").description
    for ref in ("gray7-int8@champion", "gray7-int8-onnx@champion"):
        pulled = _invoke("pull", ref, "--evaluate", "--data-dir", data_dir, "--output", tracking_store / "pulled")
        assert pulled.exit_code == 0, pulled.output
        assert "matches the registered" in pulled.stdout


def test_non_square_nchw_model_on_an_npz_dataset(tracking_store, tmp_path):
    """A 24x40 (height x width) RGB NCHW model with 5 classes: height and width must not be swapped anywhere."""
    rng = np.random.default_rng(5)
    labels = {split: rng.permutation(np.repeat(np.arange(5), n)) for split, n in (("train", 16), ("test", 8))}
    images = {split: np.stack([np.clip(rng.normal(40 * c + 30, 30, (3, 24, 40)) + np.linspace(0, 60 * (c % 2), 40),
                                       0, 255).astype(np.uint8) for c in lab]) for split, lab in labels.items()}
    path = write_npz(tmp_path / "rgb5.npz", (images["train"], labels["train"]), (images["test"], labels["test"]))
    model_path = tmp_path / "rgb5.onnx"
    model = fit_dense_head(tiny_cnn(layout="NCHW", size=(24, 40), classes=5, seed=1),
                           images["train"].astype(np.float32), labels["train"])
    onnx.save(model, str(model_path))
    variants = ("pytorch-fx-int8-x86", "ort-int8")
    result = run_sweep(SweepOptions(model_path=model_path, data_dir=path, calibration_size=50, variants=variants,
                                    bench=False, register=False, weight_rounding="nearest"))
    assert [o.status for o in result.outcomes] == ["ok"] * 3
    fp32 = result.outcomes[0].evaluation.accuracy
    assert fp32 == pytest.approx(_onnxruntime_accuracy(model_path, images["test"], labels["test"], NCHW))
    assert fp32 > 0.5
    for outcome in result.outcomes[1:]:
        assert outcome.fidelity.top1_agreement >= 0.9, outcome.name
    params = runs_by_name()["ort-int8"].data.params
    assert params[Param.INPUT_SIZE] == "24x40" and params[Param.INPUT_LAYOUT] == NCHW
    assert params[Param.NUM_CLASSES] == "5" and params[Param.DATA_FORMAT] == "npz"


def test_resize_feeds_a_larger_model_and_pull_resizes_the_same_way(tracking_store, tiny_model, cifar_dir):
    data = load_dataset(cifar_dir)
    model_path = tracking_store / "big.onnx"
    big = resize_images(data.train.images, (40, 40))
    onnx.save(fit_dense_head(tiny_cnn(size=40), big.transpose(0, 2, 3, 1).astype(np.float32), data.train.labels),
              str(model_path))
    refused = _invoke("sweep", "--model", model_path, "--data-dir", cifar_dir)
    assert refused.exit_code == 2 and "pass --resize" in refused.stderr and all_runs() == []
    result = run_sweep(SweepOptions(model_path=model_path, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("ort-int8-u8s8",), bench=False, weight_rounding="nearest",
                                    resize=True))
    fp32 = result.outcomes[0].evaluation.accuracy
    assert fp32 == pytest.approx(_onnxruntime_accuracy(model_path, resize_images(data.test.images, (40, 40)),
                                                       data.test.labels, NHWC))
    params = runs_by_name()["ort-int8-u8s8"].data.params
    assert params[Param.RESIZE] == "bilinear from 32x32" and params[Param.INPUT_SIZE] == "40x40"
    assert MlflowClient().get_model_version("big-int8-onnx", "1").tags[VersionTag.RESIZE] == "bilinear from 32x32"
    pulled = _invoke("pull", "big-int8-onnx", "--version", "1", "--evaluate", "--data-dir", cifar_dir,
                     "--output", tracking_store / "pulled")
    assert pulled.exit_code == 0 and "matches the registered" in pulled.stdout, pulled.output


def test_dynamic_size_needs_input_size(tracking_store, cifar_dir):
    model_path = tracking_store / "dynamic.onnx"
    onnx.save(tiny_cnn(global_pool=True, input_shape=["N", "H", "W", 3]), str(model_path))
    missing = _invoke("baseline", "--model", model_path, "--data-dir", cifar_dir)
    assert missing.exit_code == 2 and all_runs() == []
    [line] = [line for line in missing.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and "[N,?,?,3] has no fixed height and width; pass --input-size" in line
    other = _invoke("baseline", "--model", model_path, "--data-dir", cifar_dir, "--input-size", "48x48")
    assert other.exit_code == 2 and "pass --resize" in other.stderr and all_runs() == []
    ran = _invoke("baseline", "--model", model_path, "--data-dir", cifar_dir, "--input-size", "32x32")
    assert ran.exit_code == 0, ran.output
    assert runs_by_name()["fp32"].data.params[Param.INPUT_SIZE] == "32x32"


def test_mean_and_std_options_are_used_and_recorded(tracking_store, tiny_model, cifar_dir):
    result = _invoke("baseline", "--model", tiny_model, "--data-dir", cifar_dir, "--preprocessing", "unit",
                     "--mean", "0.5,0.4,0.3", "--std", "0.25, 0.5, 1")
    assert result.exit_code == 0, result.output
    fp32 = runs_by_name()["fp32"]
    assert fp32.data.params[Param.INPUT_MEAN] == "0.5,0.4,0.3" and fp32.data.params[Param.INPUT_STD] == "0.25,0.5,1.0"
    data = load_dataset(cifar_dir)
    x = InputTransform(NHWC, Preprocessing.unit, (0.5, 0.4, 0.3), (0.25, 0.5, 1.0))(data.test.images)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    expected = float((session.run(None, {"input_1:0": x})[0].argmax(1) == data.test.labels).mean())
    assert fp32.data.metrics["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("args,fragments", [
    (["--mean", "0.5,0.5", "--std", "1,1"], ["--mean/--std give 2 values", "3 channels"]),
    (["--mean", "0.5"], ["--mean and --std go together"]),
    (["--mean", "a,b,c", "--std", "1,1,1"], ["--mean takes comma-separated numbers"]),
    (["--input-size", "big"], ["--input-size takes HEIGHTxWIDTH"]),
])
def test_bad_input_options_are_one_line(tracking_store, tiny_model, cifar_dir, args, fragments):
    result = _invoke("sweep", "--model", tiny_model, "--data-dir", cifar_dir, *args)
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    assert all_runs() == []


@pytest.mark.parametrize("build,fragments", [
    (lambda: tiny_cnn(classes=7), ["the model outputs 7 scores per image but the data has 10 classes"]),
    (lambda: tiny_cnn(size=48), ["images are 32x32 but the model takes 48x48; pass --resize"]),
    (lambda: tiny_cnn(channels=1), ["the model takes 1-channel images", "have 3-channel images"]),
], ids=["classes", "size", "channels"])
def test_a_model_that_does_not_fit_the_data_is_one_line_before_any_run(tracking_store, cifar_dir, build, fragments):
    path = tracking_store / "misfit.onnx"
    onnx.save(build(), str(path))
    result = _invoke("sweep", "--model", path, "--data-dir", cifar_dir)
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    assert all_runs() == []


def test_calibration_shortfall_is_said_and_recorded(tracking_store, tiny_model, cifar_dir, tmp_path):
    data = load_dataset(cifar_dir)
    keep = sorted(np.flatnonzero(data.train.labels != 3).tolist() + np.flatnonzero(data.train.labels == 3)[:4].tolist())
    path = write_npz(tmp_path / "few-cats.npz", (data.train.images[keep], data.train.labels[keep]),
                     (data.test.images, data.test.labels), data.class_names)
    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=path, calibration_size=CALIBRATION_SIZE,
                                    variants=("ort-int8",), bench=False, register=False, weight_rounding="nearest"))
    assert result.outcomes[1].status == "ok"
    note = "calibration took 94 images instead of 100: 1 class had fewer training images than their share, so all " \
           "of them were taken ('cat' 4 of 10)"
    for run in runs_by_name().values():
        assert run.data.tags[Tag.CALIBRATION_SHORTFALL] == note
    assert runs_by_name()["ort-int8"].data.params[Param.CALIBRATION_SIZE] == "94"
