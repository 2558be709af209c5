"""CI smoke check: the latest sweep in the store has a FINISHED run with metrics for every int8/uint8 variant, each
within the accuracy limits below, the PyTorch uint8 refusal on record, and registered versions. Exits non-zero with
the reason otherwise."""

import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ptqflow.pipelines.shared.choices import VARIANT_NAMES  # noqa: E402
from ptqflow.tracking import runs  # noqa: E402
from ptqflow.tracking.keys import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, DEFAULT_REGISTERED_ONNX_MODEL, Metric, Tag  # noqa: E402

UNSUPPORTED = {"pytorch-fx-uint8"}
# Accuracy limits every int8/uint8 variant must meet on the CI smoke sweep (the real ResNet8, first 2,000 test
# images), where the variants measure 98.3-98.9% top-1 agreement with FP32.
MAX_ABS_ACCURACY_DELTA_PP = 0.5  # |accuracy - FP32 accuracy|, percentage points
MIN_TOP1_AGREEMENT = 0.975  # share of test images whose top-1 class matches FP32's


def accuracy_problems(name: str, metrics: dict) -> list[str]:
    """The variant's breaches of the accuracy limits, each naming the numbers; a missing metric is one too."""
    missing = [k for k in (Metric.ACCURACY_DELTA_PP, Metric.TOP1_AGREEMENT) if k not in metrics]
    if missing:
        return [f"{name}: no {', '.join(missing)} metric"]
    delta, agreement = metrics[Metric.ACCURACY_DELTA_PP], metrics[Metric.TOP1_AGREEMENT]
    problems = []
    if not abs(delta) <= MAX_ABS_ACCURACY_DELTA_PP:  # (also catches NaN)
        accuracy = metrics.get(Metric.ACCURACY, float("nan"))
        problems.append(f"{name}: accuracy delta {delta:+.2f} pp vs FP32 exceeds the limit of "
                        f"±{MAX_ABS_ACCURACY_DELTA_PP} pp (accuracy {100 * accuracy:.2f}%)")
    if not agreement >= MIN_TOP1_AGREEMENT:
        problems.append(f"{name}: top-1 agreement with FP32 {100 * agreement:.2f}% is below the limit of "
                        f"{100 * MIN_TOP1_AGREEMENT:.2f}%")
    return problems


def main(experiment: str = DEFAULT_EXPERIMENT) -> int:
    client = MlflowClient()
    parent_id = runs.latest_sweep_run_id(experiment)
    children = {r.info.run_name: r for r in runs.child_runs(parent_id)}
    problems = []
    for name in VARIANT_NAMES:
        run = children.get(name)
        if run is None:
            problems.append(f"{name}: no run")
        elif name in UNSUPPORTED:
            if run.data.tags.get(Tag.STATUS) != Tag.STATUS_UNSUPPORTED:
                problems.append(f"{name}: expected status unsupported, got {run.data.tags.get(Tag.STATUS)}")
        elif run.info.status != "FINISHED" or Metric.ACCURACY not in run.data.metrics:
            problems.append(f"{name}: status {run.info.status}, metrics {sorted(run.data.metrics)}")
        else:
            m = run.data.metrics
            nan = float("nan")
            print(f"{name:22s} accuracy {100 * m[Metric.ACCURACY]:6.2f}%  "
                  f"delta {m.get(Metric.ACCURACY_DELTA_PP, nan):+.2f} pp  "
                  f"agreement {100 * m.get(Metric.TOP1_AGREEMENT, nan):6.2f}%  "
                  f"size {m.get(Metric.MODEL_SIZE_BYTES, nan) / 1024:.1f} KiB")
            problems += accuracy_problems(name, m)
    for model in (DEFAULT_REGISTERED_MODEL, DEFAULT_REGISTERED_ONNX_MODEL):
        if not client.search_model_versions(f"name = '{model}'"):
            problems.append(f"registry: no version of {model}")
    print(f"sweep {parent_id} at {mlflow.get_tracking_uri()}")
    for problem in problems:
        print(f"SMOKE FAILURE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
