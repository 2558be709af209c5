"""CI smoke check: the latest sweep in the store has a FINISHED run with metrics for every int8/uint8 variant,
the PyTorch uint8 refusal on record, and registered versions. Exits non-zero with the reason otherwise."""

import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.choices import VARIANT_NAMES  # noqa: E402
from tracking import runs  # noqa: E402
from tracking.keys import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, DEFAULT_REGISTERED_ONNX_MODEL, Metric, Tag  # noqa: E402

UNSUPPORTED = {"pytorch-fx-uint8"}


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
            print(f"{name:22s} accuracy {100 * m[Metric.ACCURACY]:6.2f}%  delta {m[Metric.ACCURACY_DELTA_PP]:+.2f} pp  "
                  f"agreement {100 * m[Metric.TOP1_AGREEMENT]:6.2f}%  size {m[Metric.MODEL_SIZE_BYTES] / 1024:.1f} KiB")
    for model in (DEFAULT_REGISTERED_MODEL, DEFAULT_REGISTERED_ONNX_MODEL):
        if not client.search_model_versions(f"name = '{model}'"):
            problems.append(f"registry: no version of {model}")
    print(f"sweep {parent_id} at {mlflow.get_tracking_uri()}")
    for problem in problems:
        print(f"SMOKE FAILURE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
