"""Latency and throughput of every variant, measured on the logged model files in their own runtimes, next to
the onnx2torch FP32 module.

    python benchmarks/latency.py --model ../shared/models/resnet8.onnx \
        --data-dir ../shared/data/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, run_default_sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    result = run_default_sweep(args.model, args.data_dir, bench=True)

    from models.benchmark import BenchConfig, benchmark
    from models.onnx_model import load_classifier, to_torch
    from models.runtime import TorchRunner
    from pipelines.cifar import load_cifar10
    from pipelines.preprocessing import InputTransform

    model = load_classifier(args.model)
    images = InputTransform(model.input.layout)(load_cifar10(args.data_dir).test.images[:256])
    eager = TorchRunner(to_torch(model))  # eager float kernels keep no per-shape state: one module serves both
    torch_fp32 = benchmark(lambda: eager.predict, images, BenchConfig())

    fp32 = next(o for o in result.outcomes if o.name == "fp32").bench
    print(f"\n{args.model.name}; {machine_line()}; threads = {fp32.threads}; µs per image\n")
    print("| model | runtime | batch 1 (p50) | batch 1 (p90) | batch 256 | b256 speedup vs ORT FP32 | "
          "b1 latency vs ORT FP32 | accuracy % | size KiB |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(name, runtime, b, accuracy, size):
        print(f"| {name} | {runtime} | {1000 * b.latency_ms_b1_p50:.0f} | {1000 * b.latency_ms_b1_p90:.0f} | "
              f"{1e6 / b.throughput_ips_b256:.0f} | {b.throughput_ips_b256 / fp32.throughput_ips_b256:.2f}x | "
              f"{b.latency_ms_b1_p50 / fp32.latency_ms_b1_p50:.2f}x | {accuracy} | {size} |")

    for o in result.outcomes:
        if o.bench is None:
            continue
        runtime = "onnxruntime" if o.framework == "onnxruntime" else "TorchScript"
        size = f"{o.size_bytes / 1024:.0f}" if o.size_bytes else f"{model.size_bytes / 1024:.0f}"
        row(o.name, runtime, o.bench, f"{100 * o.evaluation.accuracy:.2f}", size)
    row("fp32 (onnx2torch module)", "torch eager", torch_fp32, "", "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
