"""A model shaped like the public MobileNetV1 0.25 of issue 24 (MLPerf Tiny's Visual Wake Words network): 96x96x3
NHWC input in 0..1, 13 depthwise-separable blocks of 8 to 256 channels with BatchNorm folded and ReLU6, TF "same"
padding at stride 2 (bottom and right only, a ZeroPad2d), a 3x3 average pool, a 1x1 convolution as the classifier,
`reshape(x.shape[0], 2)` and softmax; exported with torch.onnx at opset 11 with a fixed batch of 1. A fifth of each
channel of the later layers is dead (never above zero), as in long-trained MobileNets. It learns vehicle (0) against
animal (1) from CIFAR-10 training images upscaled to 96x96; the sweep sees the 32x32 images with `--resize`.

Used by benchmarks/families.py; `python benchmarks/vww_shaped.py OUT.onnx --data-dir ...` builds one alone.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mobilenet_speed import BLOCKS  # noqa: E402  (the same 13 blocks, 8 to 256 channels)

ANIMALS = (2, 3, 4, 5, 6, 7)  # CIFAR-10 classes of label 1; the other four (vehicles) are label 0
DEAD_FROM_NORM = 8  # BatchNorms from this one on get dead channels
DEAD_SHARE = 5  # one in five


def two_classes(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, ANIMALS).astype(np.int64)


def _network():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list:
        pad = [nn.ZeroPad2d((0, 1, 0, 1))] if stride == 2 else []  # TF "same" at stride 2
        return [*pad, nn.Conv2d(cin, cout, kernel, stride, 0 if stride == 2 else kernel // 2, groups=groups,
                                bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU6()]

    class MobileNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            layers = conv_bn(3, 8, 3, 2)
            for cin, cout, stride in BLOCKS:
                layers += conv_bn(cin, cin, 3, stride, groups=cin) + conv_bn(cin, cout, 1, 1)
            self.features = nn.Sequential(*layers)
            self.pool = nn.AvgPool2d(3)
            self.classifier = nn.Conv2d(256, 2, 1)

        def forward(self, x):
            x = self.classifier(self.pool(self.features(x.permute(0, 3, 1, 2))))
            return torch.softmax(x.reshape(x.shape[0], 2), 1)

    torch.manual_seed(0)
    model = MobileNetV1()
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # dead channels: a bias no normalized input overcomes, so they never learn back
        for norm in norms[DEAD_FROM_NORM:]:
            dead = torch.randperm(norm.num_features, generator=generator)[: norm.num_features // DEAD_SHARE]
            norm.bias[dead] = -20.0
    return model


def vww_shaped(path: Path, images: np.ndarray, labels: np.ndarray, epochs: int = 8) -> Path:
    """Train on N x 3 x 32 x 32 uint8 `images` with two-class `labels`, upscaled to 96x96, and export to `path`."""
    import torch
    import torch.nn.functional as F

    model = _network()
    x_all = torch.from_numpy(images.astype(np.float32) / 255.0)
    y_all = torch.from_numpy(labels.astype(np.int64))
    steps_per_epoch = len(x_all) // 64
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    torch.manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all))
        for step in range(steps_per_epoch):
            chosen = order[step * 64:(step + 1) * 64]
            x = F.interpolate(x_all[chosen], size=96, mode="bilinear", align_corners=False)
            if step % 2:
                x = x.flip(3)
            loss = F.nll_loss(model(x.permute(0, 2, 3, 1)).clamp_min(1e-7).log(), y_all[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, torch.zeros(1, 96, 96, 3), str(path), opset_version=11, dynamo=False,
                          input_names=["input"], output_names=["probabilities"])
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(args.data_dir).train
    vww_shaped(args.out, train.images[:args.train_images], two_classes(train.labels[:args.train_images]),
               args.epochs)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
