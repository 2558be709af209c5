"""Speed of model files in interleaved rounds: every round times each file once (a freshly loaded model per batch
size, as the sweep does), so a change of load on a shared machine falls on all of them alike. Prints each file's
median batch-256 throughput with its range over the rounds, its ratio to the first file (the median of the
per-round ratios, with their range) and its median batch-1 p50 latency.

    python benchmarks/interleaved.py ../shared/models/resnet8.onnx ort-int8/model.onnx fx-x86/model.pt \
        fx-onednn/model.pt@onednn --data-dir ../shared/data/cifar-10-batches-py \
        [--rounds 5] [--engine x86] [--threads 1]

The first file is the reference (an FP32 ONNX model). ONNX files run in onnxruntime, `.pt` files as TorchScript
under the engine named after `@` (`model.pt@onednn`), else under --engine. Images: the first 256 test images, NHWC
raw pixels (ResNet8's input). Threads: by default each file's single images on the count it answers fastest on (one
or all cores, chosen once per file, as the sweep chooses them) and batches on all cores; `--threads N` runs every
file on N threads for both, so the ratios compare the files at one and the same runtime setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model files (a .pt file may end in @engine); the first is the "
                                                  "reference")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", default="x86", help="torch quantized engine for .pt files")
    parser.add_argument("--threads", type=int, default=0, help="threads for both batch sizes (0: as the sweep)")
    args = parser.parse_args()

    import numpy as np

    from ptqflow.models.runtime.latency import BenchConfig, benchmark, choose_latency_threads
    from ptqflow.models.runtime.runners import load_runner
    from ptqflow.pipelines.data.cifar import load_cifar10

    engines = {Path(m.rsplit("@", 1)[0]): (m.rsplit("@", 1)[1] if "@" in m else args.engine) for m in args.models}
    args.models = list(engines)
    test = load_cifar10(args.data_dir).test
    images = np.ascontiguousarray(test.images[:256].transpose(0, 2, 3, 1).astype(np.float32))
    throughput = {path: [] for path in args.models}
    latency = {path: [] for path in args.models}

    def load(path):
        engine = engines[path] if path.suffix == ".pt" else None
        return lambda threads: load_runner(path, threads, engine=engine).predict

    config = BenchConfig(threads=args.threads, latency_threads=args.threads)
    chosen = {path: choose_latency_threads(load(path), images, config) for path in args.models}
    for _ in range(args.rounds):
        for path in args.models:
            result = benchmark(load(path), images, BenchConfig(threads=args.threads, latency_threads=chosen[path]))
            throughput[path].append(result.throughput_ips_b256)
            latency[path].append(result.latency_ms_b1_p50)

    reference = args.models[0]
    print(f"machine: {machine_line()}")
    print(f"{args.rounds} interleaved rounds; ratios to {reference.name} round by round; batches on "
          f"{config.resolved_threads} threads\n")
    print("| model | b256 images/s, median [range] | µs per image | b256 ratio, median [range] | b1 p50 ms | "
          "b1 threads | b1 latency ratio, median [range] |")
    print("|---|---|---|---|---|---|---|")
    for path in args.models:
        ratios = [a / b for a, b in zip(throughput[path], throughput[reference])]
        b1 = [a / b for a, b in zip(latency[path], latency[reference])]
        median = statistics.median(throughput[path])
        engine = f" ({engines[path]})" if path.suffix == ".pt" else ""
        print(f"| {'/'.join(path.parts[-3:])}{engine} | {median:.0f} [{min(throughput[path]):.0f}-"
              f"{max(throughput[path]):.0f}] | {1e6 / median:.0f} | {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {statistics.median(latency[path]):.3f} | {chosen[path]} | "
              f"{statistics.median(b1):.2f}x [{min(b1):.2f}-{max(b1):.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
