"""Enumerated CLI choices, kept free of heavy imports so `ptqflow --help` stays fast."""

from enum import Enum


class Preprocessing(str, Enum):
    raw = "raw"  # float32 0..255, what the MLPerf Tiny ResNet8 expects
    unit = "unit"  # float32 0..1
    standardize = "standardize"  # (x - mean) / std per channel on 0..255: CIFAR-10's unless --mean/--std say


class DataFormat(str, Enum):
    auto = "auto"  # detected from what --data-dir holds
    cifar10 = "cifar10"  # CIFAR-10 Python pickles (batches.meta, data_batch_1..5, test_batch)
    cifar100 = "cifar100"  # CIFAR-100 Python pickles (meta, train, test; fine labels)
    imagefolder = "imagefolder"  # train/<class>/*.png|jpg and test/<class>/ (or val/<class>/), decoded with Pillow
    npz = "npz"  # one .npz file with x_train, y_train, x_test, y_test (NHWC, uint8 or float)


class LayoutChoice(str, Enum):
    auto = "auto"  # read it from the model's input shape
    nhwc = "NHWC"
    nchw = "NCHW"


class CalibrationMethod(str, Enum):
    minmax = "MinMax"
    entropy = "Entropy"
    percentile = "Percentile"
    distribution = "Distribution"


VARIANT_NAMES = ("pytorch-fx-int8", "pytorch-fx-int8-x86", "pytorch-fx-int8-onednn", "ort-int8", "ort-uint8",
                 "ort-int8-u8s8", "pytorch-fx-uint8")
PYTORCH_VARIANTS = tuple(n for n in VARIANT_NAMES if n.startswith("pytorch"))
ORT_VARIANTS = tuple(n for n in VARIANT_NAMES if n.startswith("ort"))


class Equalization(str, Enum):
    auto = "auto"  # on or off per variant, whichever agrees with FP32 on more held-out training images
    on = "on"  # cross-layer equalization on every variant
    off = "off"


class WeightRounding(str, Enum):
    adaround = "adaround"  # AdaRound the FP32 weights onto the int8 grid first (slower, more faithful)
    nearest = "nearest"  # the quantizer's own round-to-nearest
