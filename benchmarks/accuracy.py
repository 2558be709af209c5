"""Accuracy, change vs FP32 and top-1 agreement of every variant of the default sweep.

    python benchmarks/accuracy.py --model ../shared/models/resnet8.onnx \
        --data-dir ../shared/data/cifar-10-batches-py [--calibration-size 1000]
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
    parser.add_argument("--calibration-size", type=int, default=1000)
    parser.add_argument("--calibration-seed", type=int, default=0)
    args = parser.parse_args()
    result = run_default_sweep(args.model, args.data_dir, bench=False, calibration_size=args.calibration_size,
                               calibration_seed=args.calibration_seed)
    print(f"\n{args.model.name}, {args.calibration_size} calibration images (seed {args.calibration_seed}), "
          f"{machine_line()}\n")
    print("| variant | weights / activations | format | accuracy % | Δ pp | agreement % | KL vs FP32 | SQNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    reference = next(o for o in result.outcomes if o.name == "fp32").evaluation.accuracy
    for o in result.outcomes:
        if o.evaluation is None:
            print(f"| {o.name} | {o.spec.weight_dtype} / {o.spec.activation_dtype} | {o.spec.quant_format} | "
                  f"{o.status}: {o.reason} | | | | |")
            continue
        dtypes = f"{o.spec.weight_dtype} / {o.spec.activation_dtype}" if o.spec else "float32 / float32"
        fmt = o.spec.quant_format if o.spec else "onnx"
        print(f"| {o.name} | {dtypes} | {fmt} | {100 * o.evaluation.accuracy:.2f} | "
              f"{100 * (o.evaluation.accuracy - reference):+.2f} | {100 * o.fidelity.top1_agreement:.2f} | "
              f"{o.fidelity.kl_divergence:.4f} | {o.fidelity.sqnr_db:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
