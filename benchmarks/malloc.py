"""What reusing freed memory (ptqflow.models.runtime.allocator) does to a TorchScript model's batch time, each setting
in its own fresh process (the setting is process-wide and cannot be undone), alternating round by round:

    python benchmarks/malloc.py fx-onednn/model.pt --engine onednn [--rounds 4] [--shape 256,32,32,3]

Prints, per setting, the median milliseconds per batch with its range over the rounds and the minor page faults per
call. The input is random raw pixels of `--shape` (ResNet8's NHWC batch of 256 by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402

ONE_PROCESS = """
import json, resource, sys, time
import torch
from ptqflow.models.runtime import allocator
from ptqflow.models.runtime.runners import TorchRunner

path, engine, shape, reuse = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3].split(",")], sys.argv[4] == "1"
if not reuse:  # TorchRunner applies the setting: this process keeps glibc's defaults instead
    allocator.reuse_freed_memory = lambda: allocator.DEFAULT
runner = TorchRunner.from_torchscript(path, engine)
batch = (torch.rand(shape) * 255).numpy()
for _ in range(5):
    runner.predict(batch)
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(20):
    runner.predict(batch)
print(json.dumps({"ms": (time.perf_counter() - start) / 20 * 1e3,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 20,
                  "setting": allocator.reuse_freed_memory()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a TorchScript file (.pt)")
    parser.add_argument("--engine", default="x86", help="torch quantized engine it was quantized for")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shape", default="256,32,32,3", help="input batch shape, comma-separated")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for reuse in results:
            out = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(args.model), args.engine, args.shape, reuse],
                                 capture_output=True, text=True, check=True)
            results[reuse].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(machine_line())
    print(f"\n{args.model} ({args.engine}), input {args.shape}, {args.rounds} rounds of one fresh process each\n")
    print("| malloc | ms per batch, median [range] | minor page faults per call |")
    print("|---|---|---|")
    for reuse, rounds in results.items():
        ms = [r["ms"] for r in rounds]
        faults = statistics.median(r["faults"] for r in rounds)
        print(f"| {rounds[0]['setting']} | {statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}] | {faults:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
