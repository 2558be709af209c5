"""Wall time per phase and peak memory of one default sweep.

    python benchmarks/sweep_phases.py --model ../shared/models/resnet8.onnx \
        --data-dir ../shared/data/cifar-10-batches-py --cache cold|warm [--no-bench]

Runs against a throw-away sqlite store in a temp dir (your own store is not touched) and prints a table.
--cache cold: a user's first sweep: an empty ptqflow cache (AdaRound weights, calibration ranges) in a temp dir and
a new MLflow store. --cache warm: their second sweep of the same model: one untimed sweep first (its own process),
in the same store with the same cache, then the timed one. Without --cache: your own cache as it is, a new store.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, run_default_sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--no-bench", action="store_true", help="skip latency/throughput measurement")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--cache", choices=("cold", "warm"), default=None)
    args = parser.parse_args()
    model, data_dir = args.model.resolve(), args.data_dir.resolve()
    if args.cache:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ptqflow-bench-cache-")  # removed with /tmp
    started = {}

    def untimed_first(sweep):
        # in its own process, as a user's first sweep: the timed one then starts with nothing imported or converted
        command = [sys.executable, "-c", "from ptqflow.pipelines.cli.app import app; app()", "sweep", "--model", str(model),
                   "--data-dir", str(data_dir)] + (["--no-bench"] if args.no_bench else []) + \
            (["--test-limit", str(args.test_limit)] if args.test_limit else [])
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        started["at"] = time.perf_counter()

    started["at"] = time.perf_counter()
    result = run_default_sweep(model, data_dir, before=untimed_first if args.cache == "warm" else None,
                               bench=not args.no_bench, test_limit=args.test_limit)
    wall = time.perf_counter() - started["at"]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    print(f"\nmachine: {machine_line()}")
    print(f"sweep: {'without' if args.no_bench else 'with'} benchmarking, {model.name}, cache "
          f"{args.cache or 'as it was'}\n")
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in result.phase_seconds.items():
        if phase != "total":
            print(f"| {phase} | {seconds:.1f} |")
    print(f"| **sweep total** | {result.phase_seconds['total']:.1f} |")
    print(f"| {'wall (the second sweep)' if args.cache == 'warm' else 'process wall (with imports)'} | {wall:.1f} |")
    print(f"\npeak RSS of the process: {peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
