"""Wall time per phase and peak memory of one default sweep.

    python benchmarks/sweep_phases.py --model ../shared/models/resnet8.onnx \
        --data-dir ../shared/data/cifar-10-batches-py [--no-bench]

Runs against a throw-away sqlite store in a temp dir (your own store is not touched) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--no-bench", action="store_true", help="skip latency/throughput measurement")
    parser.add_argument("--test-limit", type=int, default=None)
    args = parser.parse_args()
    model, data_dir = args.model.resolve(), args.data_dir.resolve()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.chdir(store)
        from pipelines.progress import quiet_library_warnings
        from pipelines.sweep import SweepOptions, run_sweep

        quiet_library_warnings()

        result = run_sweep(SweepOptions(model_path=model, data_dir=data_dir, bench=not args.no_bench,
                                        test_limit=args.test_limit))
    wall = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"sweep: {'without' if args.no_bench else 'with'} benchmarking, {model.name}\n")
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in result.phase_seconds.items():
        if phase != "total":
            print(f"| {phase} | {seconds:.1f} |")
    print(f"| **sweep total** | {result.phase_seconds['total']:.1f} |")
    print(f"| process wall (with imports) | {wall:.1f} |")
    print(f"\npeak RSS: {peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
