"""Batch-1 speed of a MobileNetV1 0.25 at 96x96 (the shape of the public model issue 24 measured: 13 depthwise-
separable blocks, 8 to 256 channels, fixed batch 1, NHWC, opset 11) in onnxruntime: FP32 against ptqflow's
ort-int8 recipe with and without the speed check (ptqflow.models.backends.speed_check), each on one thread and on
all cores, in interleaved rounds. The weights are random with BatchNorm statistics from the images: a kernel's time
depends on shapes, not on what the model learned, so this measures speed only.

    python benchmarks/mobilenet_speed.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402

BLOCKS = [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), *[(128, 128, 1)] * 5,
          (128, 256, 2), (256, 256, 1)]


def _export(path: Path) -> Path:
    import torch
    from torch import nn

    def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                             nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    class MobileNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                          *[separable(*block) for block in BLOCKS])
            self.classifier = nn.Linear(256, 2)

        def forward(self, x):
            return torch.softmax(self.classifier(self.features(x.permute(0, 3, 1, 2)).mean((2, 3))), 1)

    torch.manual_seed(0)
    model = MobileNetV1().train()
    with torch.no_grad():  # BatchNorm statistics from inputs, so activations keep a sane range
        model(torch.rand(64, 96, 96, 3))
    torch.onnx.export(model.eval(), torch.zeros(1, 96, 96, 3), str(path), opset_version=11, dynamo=False)
    return path


def _quantized(model: Path, work: Path, speed_check: bool) -> tuple[Path, dict]:
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.backends.ort import OrtStaticConfig, quantize
    from ptqflow.models.graph.onnx_model import load_classifier

    source = FloatModel(load_classifier(model), work / "float").for_quantization()
    calibration = np.random.default_rng(0).random((32, 96, 96, 3), dtype=np.float32)
    config = OrtStaticConfig(activation_dtype="uint8", weight_rounding="nearest", speed_check=speed_check)
    quantized = quantize(source, config, calibration, work / f"int8-speed-check-{speed_check}")
    return quantized.path, quantized.kept_float


def _p50_ms(path: Path, threads: int, image: np.ndarray, runs: int = 300) -> float:
    from ptqflow.models.runtime.runners import OrtRunner

    runner = OrtRunner(path, threads)
    for _ in range(20):
        runner.predict(image)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.predict(image)
        timings.append(time.perf_counter() - start)
    return 1e3 * statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from ptqflow.models.runtime.runners import cpu_threads

    with tempfile.TemporaryDirectory(prefix="ptqflow-mobilenet-speed-") as scratch:
        work = Path(scratch)
        fp32 = _export(work / "mobilenet_v1_025_96.onnx")
        checked, kept = _quantized(fp32, work, speed_check=True)
        unchecked, _ = _quantized(fp32, work, speed_check=False)
        files = {"fp32": fp32, "ort-int8 (speed check)": checked, "ort-int8 (every conv int8)": unchecked}
        image = np.random.default_rng(1).random((1, 96, 96, 3), dtype=np.float32)
        threads = sorted({1, cpu_threads()})
        timed = {(name, t): [] for name in files for t in threads}
        for _ in range(args.rounds):
            for name, path in files.items():
                for t in threads:
                    timed[name, t].append(_p50_ms(path, t, image))
    print(f"machine: {machine_line()}")
    print(f"{args.rounds} interleaved rounds; batch-1 p50 ms, median over the rounds; ratio to FP32's best\n")
    print("kept in FP32 by the speed check:")
    for layer, why in kept.items():
        print(f"  {layer}: {why}")
    best = min(statistics.median(timed["fp32", t]) for t in threads)
    columns = " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads)
    print(f"\n| model | {columns} | best vs FP32's best |")
    print("|---|" + "---|" * (len(threads) + 1))
    for name in files:
        medians = [statistics.median(timed[name, t]) for t in threads]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in medians) + f" | {min(medians) / best:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
