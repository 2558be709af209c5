"""Runs: start and end them with the right status, and log params, metrics, tags, artifacts and models.

Only the `tracking` package imports mlflow. Runs end FINISHED on success, KILLED on Ctrl-C or SIGTERM and FAILED on
any other exception, so a sweep never leaves a run RUNNING.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.errors import TrackingError  # noqa: E402
from tracking.keys import Artifact, Tag  # noqa: E402

# MLflow's INFO lines (database migrations, "registered model") would bury ptqflow's own one-line messages.
logging.getLogger("mlflow").setLevel(logging.WARNING)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient()


def ensure_experiment(name: str) -> str:
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            return mlflow.create_experiment(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment '{name}' is deleted; restore it in the MLflow UI or pass --experiment")
        return experiment.experiment_id
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"tracking server at {tracking_uri()} refused to open experiment '{name}': "
                            f"{exc.message.splitlines()[0]}") from exc


def process_tags() -> dict[str, str]:
    return {Tag.PID: str(os.getpid()), Tag.HOST: socket.gethostname()}


@contextmanager
def run_scope(experiment_id: str | None = None, run_name: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None):
    """Start (or, under `mlflow run`, resume) a run; end it FINISHED, KILLED or FAILED. Yields the run id."""
    try:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested, tags=tags)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"tracking server at {tracking_uri()} refused to start a run: "
                            f"{exc.message.splitlines()[0]}") from exc
    status = RunStatus.FINISHED
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        mlflow.end_run(RunStatus.to_string(status))


def log_params(params: dict) -> None:
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


def log_json(payload, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_file(path: Path, artifact_dir: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_dir)


def log_dataset(features, targets, source: str, name: str, sha256: str, context: str) -> None:
    """MLflow's own numpy digest reads only the first values, so the digest is ours: SHA-256 over all dataset
    files, cut to the 32 hex digits MLflow's dataset table stores; the full value goes in the input's tags."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow notes that a local path matches two equivalent source types
        dataset = mlflow.data.from_numpy(features, source=source, targets=targets, name=name, digest=sha256[:32])
    mlflow.log_input(dataset, context=context, tags={"sha256": sha256})


def _signature(input_example, output_example):
    from mlflow.models import infer_signature

    return infer_signature(input_example, output_example)


def save_torchscript_model(script_module, target_dir: Path, input_example, output_example,
                           pip_requirements: list[str]) -> Path:
    """Write an MLflow pytorch-flavor model dir; returns the TorchScript file inside it (the file users get)."""
    import logging

    import mlflow.pytorch

    # MLflow warns that pickle formats run code on load; TorchScript has no safer format, and pull checks SHA-256.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.pytorch.save_model(script_module, str(target_dir), serialization_format="pickle",
                              signature=_signature(input_example, output_example), input_example=input_example,
                              pip_requirements=pip_requirements)
    return target_dir / "data" / "model.pth"


def save_onnx_model(onnx_path: Path, target_dir: Path, input_example, output_example,
                    pip_requirements: list[str]) -> Path:
    """Write an MLflow onnx-flavor model dir; returns the .onnx file inside it."""
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(target_dir), signature=_signature(input_example, output_example),
                           input_example=input_example, pip_requirements=pip_requirements,
                           save_as_external_data=False)
    return target_dir / "model.onnx"


def log_model_dir(model_dir: Path) -> str:
    """Upload a saved MLflow model dir to the active run; returns the runs:/ URI that registers it."""
    mlflow.log_artifacts(str(model_dir), Artifact.LOGGED_MODEL_NAME)
    return f"runs:/{mlflow.active_run().info.run_id}/{Artifact.LOGGED_MODEL_NAME}"


@contextmanager
def scratch_dir(prefix: str = "ptqflow-"):
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"no run {run_id} at {tracking_uri()}: {exc.message.splitlines()[0]}") from exc


def child_runs(parent_run_id: str):
    run = get_run(parent_run_id)
    return client().search_runs([run.info.experiment_id], f"tags.`{Tag.MLFLOW_PARENT}` = '{parent_run_id}'",
                                max_results=1000)


def download_text(run_id: str, artifact_path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_path}")


def latest_sweep_run_id(experiment: str) -> str:
    experiment_obj = mlflow.get_experiment_by_name(experiment)
    if experiment_obj is None:
        raise TrackingError(f"no experiment '{experiment}' at {tracking_uri()}; run `ptqflow sweep` first")
    runs = client().search_runs([experiment_obj.experiment_id], f"tags.`{Tag.ROLE}` = '{Tag.ROLE_SWEEP}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"experiment '{experiment}' has no sweep run yet; run `ptqflow sweep` first")
    return runs[0].info.run_id
