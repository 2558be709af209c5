"""CIFAR-10 reading, calibration selection, preprocessing."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
from cifar_fixture import batch_bytes, write_cifar_dir

from ptqflow.common.errors import ConfigError, DataError
from ptqflow.pipelines.data.calibration import indices_digest, stratified_indices
from ptqflow.pipelines.shared.choices import Preprocessing
from ptqflow.pipelines.data.cifar import dataset_digest, load_cifar10
from ptqflow.pipelines.data.preprocessing import InputTransform


def test_fixture_files_load_with_bytes_and_with_str_keys(cifar_dir):
    with open(cifar_dir / "data_batch_1", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    with open(cifar_dir / "data_batch_1", "rb") as f:
        as_str = pickle.load(f, encoding="latin1")
    assert b"data" in as_bytes and "data" in as_str
    np.testing.assert_array_equal(as_bytes[b"data"], as_str["data"])


def test_load_cifar10_reads_every_split(cifar_dir):
    data = load_cifar10(cifar_dir)
    assert data.train.images.shape == (200, 3, 32, 32) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (100, 3, 32, 32)
    assert np.bincount(data.train.labels).tolist() == [20] * 10
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    assert data.digest == dataset_digest(cifar_dir) and len(data.digest) == 64


def test_digest_changes_when_one_pixel_changes(tmp_path):
    root = write_cifar_dir(tmp_path / "a", train_per_class=2, test_per_class=1)
    before = dataset_digest(root)
    raw = bytearray((root / "test_batch").read_bytes())
    raw[-200] ^= 1
    (root / "test_batch").write_bytes(bytes(raw))
    assert dataset_digest(root) != before


def test_wrong_shaped_data_is_refused(tmp_path, cifar_dir):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(cifar_dir, root)
    (root / "data_batch_2").write_bytes(batch_bytes(np.zeros((2, 1000), dtype=np.uint8), [0, 1]))
    with pytest.raises(DataError, match="3072"):
        load_cifar10(root)


def test_pickle_of_arbitrary_class_is_refused(tmp_path, cifar_dir):
    import collections
    import shutil

    root = tmp_path / "d"
    shutil.copytree(cifar_dir, root)
    (root / "test_batch").write_bytes(pickle.dumps(collections.OrderedDict(data=1), protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        load_cifar10(root)


def test_stratified_indices_are_balanced_sorted_and_seeded():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(3).permutation(500)]
    first = stratified_indices(labels, 100, seed=0)
    assert np.bincount(labels[first], minlength=10).tolist() == [10] * 10
    assert (np.diff(first) > 0).all()
    np.testing.assert_array_equal(first, stratified_indices(labels, 100, seed=0))
    assert not np.array_equal(first, stratified_indices(labels, 100, seed=1))
    assert indices_digest(first) == indices_digest(first.copy()) != indices_digest(stratified_indices(labels, 100, 1))


def test_held_out_images_are_other_training_images_balanced_and_seeded():
    """The images that choose between AdaRound and nearest rounding are never calibration images (nor test ones:
    they come from the training labels), an equal share per class, the same for the same seed."""
    from ptqflow.pipelines.data.calibration import held_out_indices

    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(3).permutation(500)]
    calibration = stratified_indices(labels, 100, seed=0)
    held_out = held_out_indices(labels, calibration, 200, seed=0)
    assert len(held_out) == 200 and not set(held_out) & set(calibration)
    assert np.bincount(labels[held_out], minlength=10).tolist() == [20] * 10
    np.testing.assert_array_equal(held_out, held_out_indices(labels, calibration, 200, seed=0))
    assert not np.array_equal(held_out, held_out_indices(labels, calibration, 200, seed=1))
    assert len(held_out_indices(labels, calibration, 10_000, seed=0)) == 400  # all that is left, no more
    assert len(held_out_indices(labels, calibration, 0, seed=0)) == 0
    assert len(held_out_indices(labels, calibration, 3, seed=0)) == 3  # fewer than the classes: by rank
    assert len(held_out_indices(labels, np.arange(500), 50, seed=0)) == 0  # nothing left


def test_stratified_selection_is_a_keyed_hash_ranking_not_a_numpy_random_stream():
    # An independent re-implementation: rank each class's indices by BLAKE2b(index, key=seed), take the first k.
    def rank(i: int) -> bytes:
        return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, key=b"7").digest()

    labels = np.array([0, 1] * 10)
    expected = sorted(sorted(range(0, 20, 2), key=rank)[:2] + sorted(range(1, 20, 2), key=rank)[:2])
    assert stratified_indices(labels, 4, seed=7, num_classes=2).tolist() == expected


@pytest.mark.parametrize("size", [0, 5, -10])
def test_calibration_size_must_be_positive_and_cover_every_class(size):
    with pytest.raises(ConfigError):
        stratified_indices(np.repeat(np.arange(10), 5), size, 0)


def test_a_size_that_is_no_multiple_of_the_class_count_gives_the_first_classes_one_more():
    labels = np.repeat(np.arange(10), 5)
    assert np.bincount(labels[stratified_indices(labels, 15, 0)]).tolist() == [2] * 5 + [1] * 5


def test_input_transform_layouts_and_scalings():
    images = np.arange(2 * 3 * 32 * 32, dtype=np.int64).reshape(2, 3, 32, 32) % 256
    images = images.astype(np.uint8)
    nhwc = InputTransform("NHWC")(images)
    assert nhwc.shape == (2, 32, 32, 3) and nhwc.dtype == np.float32
    assert nhwc[1, 4, 5, 2] == images[1, 2, 4, 5]
    nchw = InputTransform("NCHW", Preprocessing.unit)(images)
    assert nchw.shape == (2, 3, 32, 32) and nchw.max() <= 1.0
    standardized = InputTransform("NCHW", Preprocessing.standardize)(images)
    assert abs(float(standardized.mean())) < 3
