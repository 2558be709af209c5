"""Small CNNs written by the exporters users bring, trained briefly on fixture images so their weights mean something:
a plain `torch.onnx.export` (TorchScript exporter, opset 17) of a greyscale CNN that scales its own input, and a
MobileNetV1-style depthwise-separable CNN (BatchNorm, ReLU6) exported at opset 11 with a fixed batch of 1, NHWC."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _seeded(build, seed: int = 0):
    """`build()` with torch's generator seeded first: the initial weights are the same in every process and
    whatever ran before, so each fixture trains to the same model every time."""
    import torch

    torch.manual_seed(seed)
    return build()


def _train(model, images: np.ndarray, labels: np.ndarray, steps: int = 150, seed: int = 0, batch: int = 256):
    """A few Adam steps on the fixture set (the whole set per step, or a random `batch` of a larger one): enough
    for the model to tell the classes apart. BatchNorm layers keep their statistics (eval mode), as when a model
    trained elsewhere is fine-tuned."""
    import torch

    torch.manual_seed(seed)
    x, y = torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    for _ in range(steps):
        chosen = torch.randperm(len(x))[:batch] if len(x) > batch else slice(None)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[chosen]), y[chosen]).backward()
        optimizer.step()
    return model.eval()


_TRAINED: dict[tuple, dict] = {}  # trained weights by model family and training data, for this process


def _trained_once(family: str, build, images: np.ndarray, labels: np.ndarray):
    """`build()` trained by _train on (images, labels); a second call for the same family and data loads the weights
    the first one trained instead of training again (9 s on two cores). `build` may differ between calls only in
    modules without weights, such as the form an activation is written in."""
    import hashlib

    key = (family, images.shape, hashlib.sha256(images.tobytes() + labels.astype(np.int64).tobytes()).hexdigest())
    if key in _TRAINED:
        model = build()
        model.load_state_dict(_TRAINED[key])
        return model.eval()
    model = _train(_seeded(build), images, labels)
    _TRAINED[key] = {name: value.clone() for name, value in model.state_dict().items()}
    return model


def _export(model, example, path: Path, opset: int, dynamic_batch: bool, dynamo: bool = False) -> Path:
    """The legacy TorchScript exporter at `opset`, or with `dynamo` what `torch.onnx.export(model, args, path)`
    writes by default since torch 2.9: the dynamo exporter (onnxscript) at its own default opset (20 in torch 2.14),
    its ONNX graph optimized (ReduceMean for pooling, allowzero on every Reshape), `opset` ignored."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        if dynamo:
            batch = {0: torch.export.Dim("n", min=1, max=4096)} if dynamic_batch else None
            torch.onnx.export(model, (example.repeat(2, 1, 1, 1) if dynamic_batch else example,), str(path),
                              input_names=["images"], output_names=["scores"], verbose=False,
                              dynamic_shapes=(batch,) if batch else None)
            return path
        torch.onnx.export(model, example, str(path), opset_version=opset, dynamo=False, input_names=["images"],
                          output_names=["scores"],
                          dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}} if dynamic_batch else None)
    return path


def plain_export_cnn(path: Path, images: np.ndarray, labels: np.ndarray, classes: int) -> Path:
    """Greyscale NCHW CNN, raw 0..255 input divided by 255 inside the model, a residual Add, global average pooling,
    Flatten and Gemm; exported as `torch.onnx.export(..., opset_version=17, dynamo=False)` does by default."""
    import torch
    from torch import nn

    class PlainCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 12, 3, stride=2, padding=1)
            self.body = nn.Conv2d(12, 12, 3, padding=1)
            self.head = nn.Linear(12, classes)

        def forward(self, x):
            y = torch.relu(self.stem(x / 255.0))
            y = y + torch.relu(self.body(y))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    model = _train(_seeded(PlainCnn), images, labels)
    return _export(model, torch.zeros(1, *images.shape[1:]), path, opset=17, dynamic_batch=True)


def mobilenet_v1_opset11(path: Path, images_nhwc: np.ndarray, labels: np.ndarray, classes: int) -> Path:
    """NHWC input (0..1), a stem conv and three depthwise-separable blocks with BatchNorm and ReLU6, global mean,
    a 1x1 convolution as the classifier, `reshape(x.shape[0], classes)` and softmax, exported at opset 11 with the
    batch fixed at 1, as Keras and TFLite MobileNets come: TF "same" padding at stride 2 pads bottom and right only,
    written as ZeroPad2d (torch.onnx computes those Pad amounts with ConstantOfShape/Concat/Slice/Cast nodes at
    opset 11), and the reshape's shape is computed from the batch size (Shape -> Gather -> Concat)."""
    import torch
    from torch import nn

    # BatchNorm without affine parameters and with fixed statistics: every folded bias is zero, and the exporter
    # shares equal ones between layers through Identity nodes (as exporters do), which onnx2torch cannot read.
    def norm(channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, affine=False)

    def same(cin: int, cout: int, stride: int, groups: int = 1) -> list:
        if stride == 1:
            return [nn.Conv2d(cin, cout, 3, 1, 1, groups=groups, bias=False)]
        return [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(cin, cout, 3, stride, 0, groups=groups, bias=False)]

    def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*same(cin, cin, stride, groups=cin), norm(cin), nn.ReLU6(),
                             nn.Conv2d(cin, cout, 1, bias=False), norm(cout), nn.ReLU6())

    class MobileNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*same(3, 8, 2), norm(8), nn.ReLU6(),
                                          separable(8, 16, 1), separable(16, 32, 2), separable(32, 32, 1))
            self.classifier = nn.Conv2d(32, classes, 1)

        def forward(self, x):
            x = self.classifier(self.features(x.permute(0, 3, 1, 2)).mean((2, 3), keepdim=True))
            return x.reshape(x.shape[0], classes)

    class WithSoftmax(nn.Module):
        def __init__(self, trained):
            super().__init__()
            self.trained = trained

        def forward(self, x):
            return torch.softmax(self.trained(x), 1)

    model = _train(_seeded(MobileNetV1), images_nhwc / 255.0, labels)
    return _export(WithSoftmax(model).eval(), torch.zeros(1, *images_nhwc.shape[1:]), path, opset=11,
                   dynamic_batch=False)


def mobilenet_v3_style(path: Path, images: np.ndarray, labels: np.ndarray, classes: int,
                       dynamo: bool = False, decomposed: bool = False) -> Path:
    """NCHW input (0..1): inverted residual blocks (1x1 expansion, depthwise 3x3, 1x1 projection, residual Add) with
    ReLU6 or HardSwish, squeeze-excitation (pool, 1x1, ReLU, 1x1, HardSigmoid, Mul), a HardSwish head; exported at
    opset 13, where the exporter writes HardSwish as x * HardSigmoid(x), or with `dynamo` by torch's default
    exporter (see _export) with a fixed batch of 1. With `decomposed`, the activations are written out as Keras's
    MobileNetV3 writes them and tf2onnx keeps them (Add, Clip, Mul): hard_sigmoid(x) = relu6(x + 3) * (1/6),
    hard_swish(x) = x * hard_sigmoid(x) in the stem and head, and the blocks' HardSwish as many PyTorch ports write
    it, x * relu6(x + 3) / 6."""
    import torch
    from torch import nn

    relu6 = nn.functional.relu6

    def keras_hard_sigmoid(x):
        return relu6(x + 3.0) * (1.0 / 6.0)

    class KerasHardSwish(nn.Module):
        def forward(self, x):
            return x * keras_hard_sigmoid(x)

    class PortHardSwish(nn.Module):
        def forward(self, x):
            return x * relu6(x + 3.0) / 6.0

    hard_sigmoid = keras_hard_sigmoid if decomposed else nn.functional.hardsigmoid
    stem_swish, block_swish = (KerasHardSwish, PortHardSwish) if decomposed else (nn.Hardswish, nn.Hardswish)

    class SqueezeExcitation(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

        def forward(self, x):
            gate = torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))
            return x * hard_sigmoid(self.expand(gate))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, expanded: int, cout: int, stride: int, activation, excite: bool):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(cin, expanded, 1), activation())
            self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded),
                                           activation())
            self.excite = SqueezeExcitation(expanded) if excite else nn.Identity()
            self.project = nn.Conv2d(expanded, cout, 1)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.project(self.excite(self.depthwise(self.expand(x))))
            return x + y if self.residual else y

    class MobileNetV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), stem_swish())
            self.blocks = nn.Sequential(InvertedResidual(16, 32, 16, 1, nn.ReLU6, False),
                                        InvertedResidual(16, 48, 24, 2, block_swish, True),
                                        InvertedResidual(24, 72, 24, 1, block_swish, True))
            self.head = nn.Sequential(nn.Conv2d(24, 64, 1), stem_swish())
            self.classifier = nn.Linear(64, classes)

        def forward(self, x):
            y = nn.functional.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1)
            return self.classifier(torch.flatten(y, 1))

    # The same weights in every export of this model and data: the activations' written form has none.
    model = _trained_once(f"mobilenet_v3_style-{classes}", MobileNetV3, images / 255.0, labels)
    return _export(model, torch.zeros(1, *images.shape[1:]), path, opset=13, dynamic_batch=not dynamo, dynamo=dynamo)


def mobilenet_v2_style(path: Path, images: np.ndarray, labels: np.ndarray, classes: int) -> Path:
    """NCHW input (0..1): a stem conv, inverted residual blocks (1x1 expansion with BatchNorm and ReLU6, depthwise
    3x3 with BatchNorm and ReLU6, linear 1x1 projection, residual Add where shapes allow), a 1x1 head with ReLU6,
    global average pooling, Flatten and a dense layer; a plain `torch.onnx.export` at opset 12, where ReLU6 is a
    Clip with min and max inputs."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if relu6 else nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expansion: int = 4):
            super().__init__()
            hidden = cin * expansion
            self.block = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                       conv_bn(hidden, cout, 1, relu6=False))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(conv_bn(3, 16, 3, 2), InvertedResidual(16, 16, 1),
                                          InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                                          conv_bn(24, 64, 1))
            self.classifier = nn.Linear(64, classes)

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    model = _seeded(MobileNetV2)
    _calibrate_batchnorm(model, images / 255.0)
    model = _train(model, images / 255.0, labels)
    return _export(model, torch.zeros(1, *images.shape[1:]), path, opset=12, dynamic_batch=True)


def _calibrate_batchnorm(model, images: np.ndarray) -> None:
    """BatchNorm statistics of the untrained model on the fixture images, as a trained model's would be: folded into
    the convolutions they give each layer a scale of its own, as real exports have."""
    import torch

    model.train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the batches
        x = torch.from_numpy(images.astype(np.float32))
        for start in range(0, len(x), 256):
            model(x[start:start + 256])
    model.eval()
