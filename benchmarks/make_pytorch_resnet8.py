"""Export the MLPerf Tiny ResNet8 the way a PyTorch user would have it: an nn.Module in NCHW with Conv2d and
BatchNorm2d kept apart (eps 1e-3), TensorFlow "same" padding ported as F.pad with the asymmetric amounts for the
stride-2 convolutions, weights loaded from the Keras HDF5 file, exported with torch.onnx.export.

    python benchmarks/make_pytorch_resnet8.py [/tmp/resnet8_pytorch_bn.onnx] \
        [--h5 ../shared/models/mlperf_tiny_pretrainedResnet.h5] [--reference ../shared/models/resnet8.onnx] \
        [--data-dir ../shared/data/cifar-10-batches-py] [--images 2000]

The ONNX file takes NCHW float [N, 3, 32, 32] raw 0..255 pixels and returns softmax probabilities [N, 10]; it keeps
its BatchNormalization nodes (the graph-rewrite and quantization paths must fold them themselves). The script
checks that with onnxruntime, and that its top-1 predictions on the first test images agree with the reference
tf2onnx export (NHWC input) on at least 99.9% of them; it exits 1 otherwise. Write the output outside the repository:
it is derived from ../shared.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
MIN_AGREEMENT = 0.999
OPSET = 13


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow/Keras "same" padding: total = max((ceil(n / s) - 1) * s + k - n, 0), any odd pixel after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class ConvSame(nn.Conv2d):
    """nn.Conv2d with TF "same" padding: symmetric via `padding` for stride 1, F.pad for stride 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_channels, out_channels, kernel, stride, padding=kernel // 2 if symmetric else 0)
        self._explicit_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad:
            x = same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    # momentum is irrelevant in eval mode; eps is Keras' 1e-3
    return nn.Sequential(ConvSame(in_channels, out_channels, kernel, stride), nn.BatchNorm2d(out_channels, eps=1e-3))


class Block(nn.Module):
    """Two conv+BN layers with a residual; the first block keeps its input, the others take a 1x1 stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3)
        self.shortcut = ConvSame(in_channels, out_channels, 1, stride) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet8(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.block1 = Block(16, 16, 1)
        self.block2 = Block(16, 32, 2)
        self.block3 = Block(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(F.relu(self.stem(x)))))
        x = torch.flatten(F.avg_pool2d(x, 8), 1)
        return torch.softmax(self.fc(x), dim=-1)

    def convs_in_keras_order(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """(conv, its BatchNorm or None) in the order the Keras file lists its Conv2D layers."""
        order = [(self.stem[0], self.stem[1])]
        for block in (self.block1, self.block2, self.block3):
            order += [(block.conv1[0], block.conv1[1]), (block.conv2[0], block.conv2[1])]
            if block.shortcut is not None:
                order.append((block.shortcut, None))
        return order


def load_keras_weights(model: ResNet8, h5_path: Path) -> None:
    """Copy kernels (HWIO -> OIHW), biases and BatchNorm statistics from the Keras file, matched by layer order and
    checked by shape and by which convolutions a BatchNormalization follows."""
    from ptqflow.models.graph.keras_resnet8 import _read_keras_file

    layers, _, _ = _read_keras_file(h5_path)
    consumers: dict[str, list] = {}
    for layer in layers:
        for name in layer.inputs:
            consumers.setdefault(name, []).append(layer)
    keras_convs = [layer for layer in layers if layer.class_name == "Conv2D"]
    torch_convs = model.convs_in_keras_order()
    if len(keras_convs) != len(torch_convs):
        raise SystemExit(f"{h5_path}: {len(keras_convs)} Conv2D layers, the port has {len(torch_convs)}")

    def put(parameter: torch.Tensor, array: np.ndarray, what: str) -> None:
        if tuple(parameter.shape) != array.shape:
            raise SystemExit(f"{what}: Keras shape {array.shape}, PyTorch shape {tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))

    for layer, (conv, bn) in zip(keras_convs, torch_convs):
        if layer.config["activation"] != "linear":
            raise SystemExit(f"{layer.name}: activation {layer.config['activation']} inside a conv is not ported")
        put(conv.weight, layer.weights["kernel"].transpose(3, 2, 0, 1), layer.name)
        put(conv.bias, layer.weights["bias"], layer.name)
        following = [c for c in consumers.get(layer.name, []) if c.class_name == "BatchNormalization"]
        if (bn is None) != (not following):
            raise SystemExit(f"{layer.name}: BatchNormalization after it in Keras does not match the port")
        if bn is not None:
            keras_bn = following[0]
            if not math.isclose(float(keras_bn.config["epsilon"]), bn.eps):
                raise SystemExit(f"{keras_bn.name}: epsilon {keras_bn.config['epsilon']}, the port uses {bn.eps}")
            for name, target in (("gamma", bn.weight), ("beta", bn.bias), ("moving_mean", bn.running_mean),
                                 ("moving_variance", bn.running_var)):
                put(target, keras_bn.weights[name], f"{keras_bn.name}/{name}")
    (dense,) = [layer for layer in layers if layer.class_name == "Dense"]
    put(model.fc.weight, dense.weights["kernel"].T, dense.name)
    put(model.fc.bias, dense.weights["bias"], dense.name)


def export(model: nn.Module, path: Path) -> str:
    """torch.onnx.export with the TorchScript exporter; `training=PRESERVE` keeps BatchNormalization (in eval mode
    the exporter would fold it into the conv). Falls back to the dynamo exporter. Returns which one was used."""
    model.eval()
    example = torch.zeros(1, 3, 32, 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # the pad amounts are traced as constants (fixed 32x32 input); PRESERVE is used with an eval-mode model
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", "It is recommended that constant folding be turned off")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["probabilities"],
                              dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}},
                              training=torch.onnx.TrainingMode.PRESERVE)
        return f"torch.onnx.export(dynamo=False, opset {OPSET}, training=PRESERVE)"
    except Exception as exc:  # the TorchScript exporter may be gone in a later torch
        print(f"TorchScript exporter unavailable ({type(exc).__name__}: {exc}); using dynamo=True", file=sys.stderr)
    batch = torch.export.Dim("N", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=17, input_names=["input"],
                                output_names=["probabilities"], dynamic_shapes=({0: batch},), optimize=False)
    program.save(str(path), external_data=False)
    return "torch.onnx.export(dynamo=True, opset 17, optimize=False)"


def predictions(session, images: np.ndarray, batch: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, nargs="?", default=Path("/tmp/resnet8_pytorch_bn.onnx"))
    parser.add_argument("--h5", type=Path, default=SHARED / "models" / "mlperf_tiny_pretrainedResnet.h5")
    parser.add_argument("--reference", type=Path, default=SHARED / "models" / "resnet8.onnx")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data" / "cifar-10-batches-py")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    if args.output.resolve().is_relative_to(ROOT):
        raise SystemExit(f"{args.output} is inside the repository; write models derived from ../shared elsewhere")

    import onnx
    import onnxruntime as ort

    from ptqflow.pipelines.data.cifar import load_cifar10

    torch.manual_seed(0)
    model = ResNet8()
    load_keras_weights(model, args.h5)
    how = export(model, args.output)
    exported = onnx.load(str(args.output))
    onnx.checker.check_model(exported)
    ops = [node.op_type for node in exported.graph.node]
    batch_norms = ops.count("BatchNormalization")
    print(f"wrote {args.output} with {how}: opset "
          f"{next(o.version for o in exported.opset_import if o.domain in ('', 'ai.onnx'))}, "
          f"{batch_norms} BatchNormalization, {ops.count('Conv')} Conv, {ops.count('Pad')} Pad")
    if batch_norms == 0:
        print("FAIL: the export has no BatchNormalization node", file=sys.stderr)
        return 1

    test = load_cifar10(args.data_dir).test.head(args.images)
    images = test.images.astype(np.float32)  # NCHW, raw 0..255
    options = {"providers": ["CPUExecutionProvider"]}
    ours = predictions(ort.InferenceSession(str(args.output), **options), images)
    reference = predictions(ort.InferenceSession(str(args.reference), **options),
                            np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        eager = model(torch.from_numpy(images[:200])).numpy()
    agreement = float(np.mean(ours.argmax(1) == reference.argmax(1)))
    print(f"top-1 agreement with {args.reference.name} on the first {len(images)} test images: "
          f"{100 * agreement:.2f}% (max |p - p_ref| {np.abs(ours - reference).max():.2e}; "
          f"ONNX vs eager PyTorch max |dp| {np.abs(ours[:200] - eager).max():.2e}); "
          f"accuracy {100 * np.mean(ours.argmax(1) == test.labels):.2f}% vs "
          f"{100 * np.mean(reference.argmax(1) == test.labels):.2f}%")
    if agreement < MIN_AGREEMENT:
        print(f"FAIL: agreement below {100 * MIN_AGREEMENT:.1f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
