"""AdaRound alone, per weight scheme, on the default sweep's calibration images.

    python benchmarks/adaround.py --model ../shared/models/resnet8.onnx \
        --data-dir ../shared/data/cifar-10-batches-py [--profile] [--agreement] [--iterations N]

For each scheme the default sweep AdaRounds (per_channel_sym_int8 for the FX and ORT int8 variants,
per_tensor_asym_uint8 for ort-uint8) it runs `adaround_onnx_schemes` exactly as `FloatModel` does for the default
variants (float classifier head, the sweep's calibration set and model batch) -- never reading or writing the
AdaRound cache -- and prints a table: scheme, layers, wall seconds, CPU seconds (process time, all threads). With
--together both schemes run in one call, as the default sweep runs them (one FP32 pass, one worker thread per scheme).
CPU seconds are the figure to compare on a shared machine; wall time depends on what else runs.

--profile prints the torch profiler's top operators (by self CPU time) for each scheme.
--agreement also prints a quick quality proxy: top-1 agreement with FP32 on the test images of the model whose
weights (only) are AdaRounded, next to the same with round-to-nearest weights (activations stay float).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402

SCHEMES = ("per_channel_sym_int8", "per_tensor_asym_uint8")


def _inputs(model: Path, data_dir: Path, calibration_size: int | None, test_limit: int | None):
    """The sweep's own inputs: calibration images, in the model's layout and preprocessing, and the test split."""
    from ptqflow.pipelines.sweep.inputs import prepare_inputs
    from ptqflow.pipelines.sweep.options import SweepOptions

    options = SweepOptions(model_path=model, data_dir=data_dir, test_limit=test_limit)
    if calibration_size:
        options.calibration_size = calibration_size
    return prepare_inputs(options)


def _nearest(proto, scheme: str):
    """Every Conv/MatMul/Gemm weight the default variants round (not the float head) snapped to nearest."""
    import onnx2torch
    import torch

    from ptqflow.models.graph.fx_prep import classifier_head, prepare_graph
    from ptqflow.models.adaround.grids import quantize_weights_like
    from ptqflow.models.adaround.onnx import replace_initializers

    gm = prepare_graph(onnx2torch.convert(proto), fold_pad=False)
    head = set(classifier_head(gm, include_pool=False))
    changes = {}
    for name, m in gm.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and name not in head:
            changes[name] = (m.weight.detach().clone(), quantize_weights_like(m.weight.detach(), scheme))
    return replace_initializers(proto, changes)


def _top1(proto, images):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 1000]})[0].argmax(1)
                           for i in range(0, len(images), 1000)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--iterations", type=int, default=None, help="default: the sweep's")
    parser.add_argument("--calibration-size", type=int, default=None, help="default: the sweep's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running: the threads the model passes and the steps of layers of "
                             "50,000+ weights use (the rest runs one torch thread per worker)")
    parser.add_argument("--together", action="store_true",
                        help="all schemes in one call (adaround_onnx_schemes), as the default sweep runs them")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker threads for --together (default: one per scheme, at most one per core)")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top operators")
    parser.add_argument("--top", type=int, default=25, help="profiler rows")
    parser.add_argument("--agreement", action="store_true",
                        help="top-1 agreement with FP32 of the weights-only rounded model on the test images")
    parser.add_argument("--test-limit", type=int, default=None)
    args = parser.parse_args()

    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.adaround.onnx import adaround_onnx_schemes
    from ptqflow.pipelines.shared.progress import quiet_library_warnings
    from ptqflow.pipelines.sweep.options import SweepOptions

    quiet_library_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = _inputs(args.model.resolve(), args.data_dir.resolve(), args.calibration_size, args.test_limit)
    iterations = args.iterations or next(f.default for f in __import__("dataclasses").fields(SweepOptions)
                                         if f.name == "adaround_iterations")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptqflow-adaround-bench-") as work:
        source = FloatModel.for_runtimes(inputs.model, Path(work)).for_quantization()
        proto = source.onnx.proto
        test_images = inputs.transform(inputs.test.images) if args.agreement else None
        fp32_top1 = _top1(proto, test_images) if args.agreement else None
        # Warm-up outside the timings: the first conversion pays for imports and lazy initialisation, which the
        # sweep pays in its convert phase.
        import onnx2torch

        from ptqflow.models.graph.fx_prep import prepare_graph

        prepare_graph(onnx2torch.convert(proto), fold_pad=False)(torch.from_numpy(inputs.calibration[:2]))
        groups = [list(args.schemes)] if args.together else [[scheme] for scheme in args.schemes]
        for schemes in groups:
            steps = []

            def advance(n, total=None):
                if total is not None:
                    steps.append(total)

            profiler = None
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU])
                profiler.__enter__()
            wall, cpu = time.perf_counter(), time.process_time()
            rounded = adaround_onnx_schemes(proto, inputs.calibration, schemes, iters=iterations, advance=advance,
                                            model_batch=source.onnx.input.batch_size or 250, round_head=False,
                                            workers=args.workers)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            label = " + ".join(schemes)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                print(f"\n## profile: {label} (top {args.top} by self CPU time)\n")
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            row = [label, steps[0] // iterations // len(schemes) if steps else "?", f"{wall:.1f}", f"{cpu:.1f}"]
            if fp32_top1 is not None:
                for scheme in schemes:
                    ada = float((_top1(rounded[scheme], test_images) == fp32_top1).mean())
                    near = float((_top1(_nearest(proto, scheme), test_images) == fp32_top1).mean())
                    row += [f"{scheme}: {100 * ada:.2f}", f"{100 * near:.2f}"]
            rows.append(row)
            print(f"{label}: wall {wall:.1f} s, CPU {cpu:.1f} s", file=sys.stderr, flush=True)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"\nmachine: {machine_line()}; torch threads: {torch.get_num_threads()}; peak RSS {peak_rss_mb:.0f} MB")
    print(f"model: {args.model.name}; calibration images: {len(inputs.calibration)}; iterations: {iterations}"
          f"{' (profiled: times include profiler overhead)' if args.profile else ''}\n")
    header = ["scheme(s)", "layers", "wall s", "CPU s"]
    if args.agreement:
        header += ["weights-only agreement % (AdaRound)", "(nearest)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
