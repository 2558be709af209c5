"""Write tiny CIFAR-10 datasets byte-for-byte in the official Python 2 pickle layout.

Python 3's pickler cannot write Python 2 `str` objects, so the opcodes are emitted by hand, the way cPickle
protocol 2 wrote the official files (SHORT_BINSTRING/BINSTRING keys and data, numpy.core.multiarray._reconstruct).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _string(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<i", len(value)) + value


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    return b"J" + struct.pack("<i", value)


def _uint8_matrix(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8 and array.ndim == 2
    rows, cols = array.shape
    dtype = (b"cnumpy\ndtype\n" + _string(b"u1") + b"\x89\x88\x87R"
             + b"(" + _int(3) + _string(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _string(b"b")
            + b"\x87R" + b"(" + _int(1) + _int(rows) + _int(cols) + b"\x86" + dtype + b"\x89"
            + _string(np.ascontiguousarray(array).tobytes()) + b"tb")


def _list(items: list[bytes]) -> bytes:
    return b"](" + b"".join(items) + b"e" if items else b"]"


def _dict(entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"}(" + b"".join(_string(k) + v for k, v in entries) + b"u"


def py2_pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def batch_bytes(images: np.ndarray, labels: list[int], label: str = "batch") -> bytes:
    """images: N x 3072 uint8 (R, G, B planes)."""
    filenames = [_string(f"img_{i:05d}.png".encode()) for i in range(len(labels))]
    return py2_pickle(_dict([
        (b"batch_label", _string(label.encode())),
        (b"labels", _list([_int(int(v)) for v in labels])),
        (b"data", _uint8_matrix(images)),
        (b"filenames", _list(filenames)),
    ]))


def meta_bytes(per_batch: int) -> bytes:
    return py2_pickle(_dict([
        (b"num_cases_per_batch", _int(per_batch)),
        (b"label_names", _list([_string(n.encode()) for n in CLASS_NAMES])),
        (b"num_vis", _int(3072)),
    ]))


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images that a tiny CNN can tell apart: each class has its own colour and stripe frequency, plus noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i, c in enumerate(labels):
        base = np.array([(c * 37) % 256, (c * 91 + 40) % 256, (c * 53 + 100) % 256], dtype=np.float32)
        stripes = 60.0 * np.sin((xx + yy * (c % 3)) * (0.2 + 0.15 * c))
        images[i] = base[:, None, None] * 0.7 + stripes[None] + rng.normal(0, 25, size=(3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar_dir(root: Path, train_per_class: int = 20, test_per_class: int = 10, seed: int = 0) -> Path:
    """Write batches.meta, data_batch_1..5 and test_batch under root (created). Returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), train_per_class))
    test_labels = rng.permutation(np.repeat(np.arange(10), test_per_class))
    train_images = make_images(train_labels, rng)
    per_batch = len(train_labels) // 5
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch if b < 4 else None)
        (root / f"data_batch_{b + 1}").write_bytes(
            batch_bytes(train_images[sl], train_labels[sl].tolist(), f"training batch {b + 1} of 5"))
    (root / "test_batch").write_bytes(
        batch_bytes(make_images(test_labels, rng), test_labels.tolist(), "testing batch 1 of 1"))
    (root / "batches.meta").write_bytes(meta_bytes(per_batch))
    return root


# ---- the same data in ptqflow's other formats, and other datasets -------------------------------------------------
def write_image_folder(root: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       class_names, test_dir: str = "test") -> Path:
    """PNG files train/<class>/<index>.png and <test_dir>/<class>/<index>.png from N x C x H x W uint8 images (C 1 or
    3). Named by their index, so ptqflow's order (by file name, then class) is the arrays' order."""
    from PIL import Image

    for split, (images, labels) in (("train", train), (test_dir, test)):
        for name in class_names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
            Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(
                root / split / class_names[int(label)] / f"{i:05d}.png")
    return root


def write_npz(path: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              class_names=None) -> Path:
    """x_train, y_train, x_test, y_test (images NHWC) from N x C x H x W images; class_names when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": train[0].transpose(0, 2, 3, 1), "y_train": np.asarray(train[1]),
              "x_test": test[0].transpose(0, 2, 3, 1), "y_test": np.asarray(test[1])}
    if class_names is not None:
        arrays["class_names"] = np.array(list(class_names))
    np.savez(path, **arrays)
    return path


def cifar100_names() -> list[str]:
    return [f"fine_{i:02d}" for i in range(100)]


def write_cifar100_dir(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """meta, train and test in the official cifar-100-python layout (Python 2 pickles; fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        filenames = [_string(f"img_{i:05d}.png".encode()) for i in range(len(labels))]
        (root / name).write_bytes(py2_pickle(_dict([
            (b"filenames", _list(filenames)),
            (b"batch_label", _string(f"{name}ing batch 1 of 1".encode())),
            (b"fine_labels", _list([_int(int(v)) for v in labels])),
            (b"coarse_labels", _list([_int(int(v) // 5) for v in labels])),
            (b"data", _uint8_matrix(make_images(labels % 10, rng))),
        ])))
    (root / "meta").write_bytes(py2_pickle(_dict([
        (b"fine_label_names", _list([_string(n.encode()) for n in cifar100_names()])),
        (b"coarse_label_names", _list([_string(f"coarse_{i:02d}".encode()) for i in range(20)])),
    ])))
    return root


def make_gray_images(labels: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """N x 1 x H x W uint8 greyscale images a tiny CNN can tell apart: a brightness and stripe frequency per class."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((len(labels), 1, h, w), dtype=np.float32)
    for i, c in enumerate(labels):
        stripes = 70.0 * np.sin((xx * (1 + c % 2) + yy * (c % 3)) * (0.15 + 0.12 * c))
        images[i, 0] = 40 + 25 * c + stripes + rng.normal(0, 20, size=(h, w))
    return np.clip(images, 0, 255).astype(np.uint8)


def gray_dataset(classes: int = 7, size: tuple[int, int] = (48, 48), train_per_class: int = 16,
                 test_per_class: int = 6, seed: int = 0):
    """((train images, labels), (test images, labels), class names) of a greyscale dataset."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(classes), train_per_class))
    test_labels = rng.permutation(np.repeat(np.arange(classes), test_per_class))
    names = [f"shape_{chr(ord('a') + c)}" for c in range(classes)]
    return ((make_gray_images(train_labels, size, rng), train_labels),
            (make_gray_images(test_labels, size, rng), test_labels), names)
