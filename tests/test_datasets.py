"""Datasets in every format (issue 12, section 1): CIFAR-10 and CIFAR-100 pickles, image folders and .npz load into
one layout; the same CIFAR-10 in three formats sweeps to identical numbers; bad data is one line and no run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pytest
from cifar_fixture import cifar100_names, write_cifar100_dir, write_image_folder, write_npz
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, all_runs, runs_by_name
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptqflow.pipelines.data.calibration import class_shares, stratified_selection
from ptqflow.pipelines.shared.choices import Preprocessing
from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.data.datasets import detect_format, load_dataset, resize_images
from ptqflow.common.errors import ConfigError, DataError
from ptqflow.pipelines.data.preprocessing import InputTransform
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS
from ptqflow.tracking.keys import Param, Tag


def _splits(data):
    return (data.train.images, data.train.labels), (data.test.images, data.test.labels)


@pytest.fixture(scope="module")
def cifar_formats(cifar_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny CIFAR-10 fixture as pickles, as a PNG image folder and as an .npz file."""
    data = load_dataset(cifar_dir)
    root = tmp_path_factory.mktemp("formats")
    return {"cifar10": cifar_dir,
            "imagefolder": write_image_folder(root / "cifar10-png", *_splits(data), data.class_names),
            "npz": write_npz(root / "cifar10-npz" / "cifar10.npz", *_splits(data), data.class_names)}


# ---- loading -----------------------------------------------------------------------------------------------------
def test_every_format_loads_the_same_images_labels_and_classes(cifar_formats):
    reference = load_dataset(cifar_formats["cifar10"])
    assert reference.format == "cifar10" and reference.title == "CIFAR-10" and reference.name == "cifar10"
    for data_format, path in cifar_formats.items():
        assert detect_format(path) == data_format
        data = load_dataset(path)
        assert data.format == data_format and data.class_names == reference.class_names
        for split, ref in ((data.train, reference.train), (data.test, reference.test)):
            assert split.images.dtype == np.uint8 and split.images.shape[1:] == (3, 32, 32)
            np.testing.assert_array_equal(split.images, ref.images)  # same order: same calibration images
            np.testing.assert_array_equal(split.labels, ref.labels)
        assert len(data.digest) == 64
    # The .npz is also found as the only .npz of its directory, and an explicit format reads it.
    npz = cifar_formats["npz"]
    assert load_dataset(npz.parent).digest == load_dataset(npz, "npz").digest


def test_image_folder_with_val_greyscale_rgba_and_palette_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("b", "a")):  # classes are sorted by folder name: a = 0, b = 1
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(tmp_path / split / name / f"{i}.png")
    data = load_dataset(tmp_path)
    assert data.format == "imagefolder" and data.class_names == ("a", "b")
    assert data.train.images.shape == (4, 1, 6, 5) and data.channels == 1 and data.image_size == (6, 5)
    # Colour modes become RGB: an RGBA and a palette image in an RGB folder load as 3 channels.
    colour = tmp_path / "colour"
    for split in ("train", "test"):
        (colour / split / "x").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(colour / split / "x" / "1.png")
        Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA").save(colour / split / "x" / "2.png")
        palette = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).convert("P")
        palette.save(colour / split / "x" / "10.png")
    data = load_dataset(colour)
    assert data.train.images.shape == (3, 3, 4, 4)
    rgba = np.asarray(Image.open(colour / "train" / "x" / "2.png").convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.train.images[1], rgba)  # natural order: 1, 2, 10


def test_cifar100_pickles_load_with_their_100_fine_class_names(tmp_path):
    root = write_cifar100_dir(tmp_path / "cifar-100-python", train_per_class=2, test_per_class=1)
    data = load_dataset(root)
    assert data.format == "cifar100" and detect_format(root) == "cifar100" and data.title == "CIFAR-100"
    assert data.class_names == tuple(cifar100_names()) and data.num_classes == 100
    assert np.bincount(data.train.labels).tolist() == [2] * 100 and len(data.test) == 100
    assert data.train.images.shape == (200, 3, 32, 32)
    with open(root / "train", "rb") as f:
        assert pickle.load(f, encoding="latin1")["fine_labels"] == data.train.labels.tolist()


def test_cifar10_format_takes_its_class_count_from_the_meta_file(tmp_path):
    from cifar_fixture import _dict, _list, _string, batch_bytes, py2_pickle

    rng = np.random.default_rng(0)
    root = tmp_path / "seven"
    root.mkdir()
    labels = np.arange(14) % 7
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (root / name).write_bytes(batch_bytes(rng.integers(0, 256, (14, 3072), dtype=np.uint8), labels.tolist()))
    (root / "batches.meta").write_bytes(py2_pickle(_dict([(b"label_names",
                                                           _list([_string(b"k%d" % i) for i in range(7)]))])))
    data = load_dataset(root)
    assert data.num_classes == 7 and data.class_names[6] == "k6" and len(data.train) == 70
    (root / "test_batch").write_bytes(batch_bytes(np.zeros((1, 3072), np.uint8), [7]))
    with pytest.raises(DataError, match="label 7 is outside 0..6"):
        load_dataset(root)


def test_npz_images_in_nchw_are_read_when_only_that_reading_fits(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([0, 1]))
    np.testing.assert_array_equal(load_dataset(tmp_path / "d.npz").train.images, x)


def test_a_code_running_cifar100_pickle_is_refused_without_running_it(tmp_path):
    import os as os_module

    class Exploit:
        def __reduce__(self):
            return (os_module.system, (f"touch {tmp_path / 'pwned'}",))

    root = write_cifar100_dir(tmp_path / "cifar-100-python")
    (root / "test").write_bytes(pickle.dumps({"data": Exploit(), "fine_labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="not allowed in a CIFAR batch"):
        load_dataset(root)
    assert not (tmp_path / "pwned").exists()


def test_float_npz_values_are_kept_as_given(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 5, 5, 1)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:2], y_test=np.array([[0], [1]]))
    data = load_dataset(tmp_path / "d.npz")
    assert data.train.images.dtype == np.float32 and data.class_names == ("0", "1")
    np.testing.assert_array_equal(data.train.images[:, 0], x[..., 0].astype(np.float32))
    # raw passes the values on unchanged; unit divides them by 255 like pixels.
    np.testing.assert_array_equal(InputTransform("NHWC")(data.test.images), x[:2].astype(np.float32))
    np.testing.assert_allclose(InputTransform("NCHW", Preprocessing.unit)(data.test.images)[:, 0],
                               x[:2, ..., 0] / 255, rtol=1e-6)


@pytest.mark.parametrize("arrays,fragment", [
    (dict(x_train=np.zeros((2, 4, 4, 2), np.uint8)), "NHWC"),
    (dict(x_train=np.zeros((2, 4, 4, 3), np.int32)), "uint8"),
    (dict(y_train=np.array([0.0, 1.0])), "integer labels"),
    (dict(y_train=np.array([0, 1, 1])), "3 labels for 2 images"),
    (dict(y_test=np.array([0, 0])), "no image of class 1"),
    (dict(x_test=np.zeros((2, 5, 5, 3), np.uint8)), "both splits"),
    (dict(x_train=np.full((2, 4, 4, 3), np.nan)), "NaN"),
], ids=["channels", "dtype", "float-labels", "count", "missing-class", "sizes", "nan"])
def test_malformed_npz_is_one_data_error(tmp_path, arrays, fragment):
    good = dict(x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]),
                x_test=np.zeros((2, 4, 4, 3), np.uint8), y_test=np.array([0, 1]))
    np.savez(tmp_path / "d.npz", **{**good, **arrays})
    with pytest.raises(DataError, match=fragment) as caught:
        load_dataset(tmp_path / "d.npz")
    assert "\n" not in str(caught.value)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz_with_pickled_objects(path: Path, marker: Path) -> Path:
    images = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(path, x_train=np.array([_Exploit(marker), 1], dtype=object), y_train=np.array([0, 1]),
             x_test=images, y_test=np.array([0, 1]))
    return path


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(DataError, match="pickled Python objects"):
        load_dataset(_npz_with_pickled_objects(tmp_path / "d.npz", marker))
    assert not marker.exists()


def _folder(tmp_path, size=(8, 8)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "f" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                    tmp_path / "f" / split / name / f"{i}.png")
    return tmp_path / "f"


def test_malformed_image_folders_name_the_bad_file(tmp_path):
    from PIL import Image

    root = _folder(tmp_path)
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / "test" / "dog" / "7.png")
    with pytest.raises(DataError, match=r"test/dog/7\.png is 7x5 .*same size"):
        load_dataset(root)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "test" / "dog" / "7.png")  # greyscale among RGB
    with pytest.raises(DataError, match=r"7\.png is 8x8 \(width x height\) with 1 channel"):
        load_dataset(root)
    (root / "test" / "dog" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    with pytest.raises(DataError, match=r"7\.png is not a readable PNG or JPEG image"):
        load_dataset(root)
    (root / "test" / "dog" / "7.png").unlink()
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="test/bird is not a class of"):
        load_dataset(root)
    (root / "test" / "bird").rmdir()
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="train/cat holds no .png"):
        load_dataset(root)


def test_unknown_layouts_and_missing_paths_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no dataset ptqflow reads.*--data-format"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="not found.*--data-dir"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="not an image folder"):
        load_dataset(tmp_path / "empty", "imagefolder")


def test_resize_is_bilinear_and_keeps_dtype():
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 3, 8, 6), dtype=np.uint8)
    out = resize_images(rgb, (12, 9))
    assert out.shape == (2, 3, 12, 9) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb[1].transpose(1, 2, 0)).resize((9, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[1], expected.transpose(2, 0, 1))
    floats = rgb[:, :1].astype(np.float32) / 7
    assert resize_images(floats, (4, 3)).dtype == np.float32
    assert resize_images(rgb, (8, 6)) is rgb


# ---- calibration over any class count ----------------------------------------------------------------------------
def test_calibration_shares_split_any_size_over_any_class_count():
    assert class_shares(1000, 10) == [100] * 10
    assert class_shares(100, 7) == [15, 15, 14, 14, 14, 14, 14]
    with pytest.raises(ConfigError, match="smaller than the 7 classes"):
        class_shares(5, 7)
    labels = np.repeat(np.arange(7), 20)
    selection = stratified_selection(labels, 100, seed=0, num_classes=7)
    assert np.bincount(labels[selection.indices]).tolist() == [15, 15, 14, 14, 14, 14, 14]
    assert selection.note() is None


def test_a_class_with_too_few_images_gives_all_it_has_and_says_so():
    labels = np.array([0] * 3 + [1] * 20 + [2] * 20)
    selection = stratified_selection(labels, 30, seed=0)
    assert np.bincount(labels[selection.indices]).tolist() == [3, 10, 10]
    note = selection.note(("cat", "dog", "owl"))
    assert note == ("calibration took 23 images instead of 30: 1 class had fewer training images than their share, "
                    "so all of them were taken ('cat' 3 of 10)")


# ---- the same data in three formats sweeps to the same numbers ----------------------------------------------------
def test_cifar10_as_pickles_png_folder_and_npz_gives_identical_results(tracking_store, tiny_model, cifar_formats):
    numbers = {}
    for data_format, path in cifar_formats.items():
        result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=path, calibration_size=CALIBRATION_SIZE,
                                        bench=False, register=False, adaround_iterations=ADAROUND_ITERATIONS,
                                        experiment=f"formats-{data_format}"))
        assert {o.name: o.status for o in result.outcomes} == {
            "fp32": "ok", **{v: "unsupported" if v == "pytorch-fx-uint8" else "ok" for v in DEFAULT_VARIANTS}}
        numbers[data_format] = {o.name: (o.evaluation.accuracy, o.fidelity.top1_agreement)
                                for o in result.outcomes if o.status == "ok"}
        runs = runs_by_name(f"formats-{data_format}")
        parent = MlflowClient().get_run(result.parent_run_id)
        assert parent.data.params[Param.DATA_FORMAT] == data_format
        # The parent logs the test set and the training set calibration draws from, named after the data.
        name = {"cifar10": "cifar10", "imagefolder": "cifar10-png", "npz": "cifar10"}[data_format]
        logged = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                  for i in parent.inputs.dataset_inputs}
        assert {context: d.name for context, d in logged.items()} == {"test": f"{name}-test", "train": f"{name}-train"}
        for name in ("fp32", "ort-int8"):
            run = runs[name]
            assert run.data.params[Param.DATA_FORMAT] == data_format
            assert run.data.params[Param.NUM_CLASSES] == "10" and run.data.params[Param.INPUT_SIZE] == "32x32"
            assert run.data.params[Param.RESIZE] == "none"
            [dataset_input] = run.inputs.dataset_inputs
            tags = {t.key: t.value for t in dataset_input.tags}
            assert tags["format"] == data_format and tags["sha256"] == run.data.tags[Tag.DATASET_DIGEST]
            assert dataset_input.dataset.source and str(path.resolve()) in dataset_input.dataset.source
        numbers[data_format]["calibration"] = parent.data.tags[Tag.CALIBRATION_DIGEST]
    assert numbers["imagefolder"] == numbers["cifar10"] == numbers["npz"]
    assert set(numbers["cifar10"]) == {"fp32", *DEFAULT_VARIANTS, "calibration"} - {"pytorch-fx-uint8"}


# ---- bad data through the CLI: one line, non-zero exit, no run -----------------------------------------------------
def _assert_one_line_and_no_run(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert all_runs() == []


def test_cli_refuses_a_malformed_image_folder_with_one_line(tracking_store, tiny_model, tmp_path):
    from PIL import Image

    root = _folder(tmp_path, size=(32, 32))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "cat" / "3.png")
    result = CliRunner().invoke(app, ["sweep", "--model", str(tiny_model), "--data-dir", str(root),
                                      "--calibration-size", "2"])
    _assert_one_line_and_no_run(result, "3.png", "16x16")


def test_cli_refuses_an_npz_with_pickled_objects_with_one_line(tracking_store, tiny_model, tmp_path):
    marker = tmp_path / "pwned"
    path = _npz_with_pickled_objects(tmp_path / "d.npz", marker)
    result = CliRunner().invoke(app, ["sweep", "--model", str(tiny_model), "--data-dir", str(path)])
    _assert_one_line_and_no_run(result, "pickled Python objects")
    assert not marker.exists()


def test_cli_data_format_that_does_not_match_the_directory(tracking_store, tiny_model, cifar_dir):
    result = CliRunner().invoke(app, ["sweep", "--model", str(tiny_model), "--data-dir", str(cifar_dir),
                                      "--data-format", "npz"])
    _assert_one_line_and_no_run(result, "0 .npz files")


def test_plots_stay_readable_with_100_classes():
    from ptqflow.pipelines.reports import plots

    names = tuple(cifar100_names())
    rng = np.random.default_rng(0)
    per_class = {v: {c: float(rng.uniform(0.5, 1)) for c in names} for v in ("fp32", "ort-int8", "ort-uint8")}
    per_class["ort-int8"]["fine_42"] = per_class["fp32"]["fine_42"] - 0.9  # the largest change is among those shown
    fig = plots.per_class_accuracy_figure(per_class)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == plots.PER_CLASS_SHOWN and any(label.startswith("fine_42 ") for label in labels)
    assert "20 of 100 classes" in ax.get_title()
    labels_true = rng.integers(0, 100, 500)
    png = plots.confusion_matrix(labels_true, labels_true, names, "ort-int8: confusion matrix")
    assert png.startswith(b"\x89PNG")
    seven = plots.per_class_accuracy_figure({v: {f"c{i}": 0.5 for i in range(7)} for v in ("fp32", "ort-int8")})
    assert len(seven.axes[0].get_xticklabels()) == 7


def test_logged_dataset_names_its_source_and_format(tracking_store, tiny_model, cifar_formats):
    run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_formats["npz"], variants=(), register=False,
                           bench=False))
    fp32 = runs_by_name()["fp32"]
    [dataset_input] = fp32.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cifar10-test"
    assert dataset_input.dataset.digest == fp32.data.tags[Tag.DATASET_DIGEST][:32]
    profile = dataset_input.dataset.profile
    assert "features_shape" in profile and "[100, 3, 32, 32]" in profile.replace("(", "[").replace(")", "]")
    assert mlflow.get_run(fp32.info.run_id).data.params[Param.DATA_FORMAT] == "npz"
