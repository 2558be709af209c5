"""What runs record: params, metrics, tags, artifacts and datasets, on the active run or on a run by id (one that is
not active, or has ended), and artifacts read back from a run."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import mlflow

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.tracking.connection import client, public_tracking_uri, refused_credentials

# Run id -> id of the MLflow logged model logged on that run (while the run is open): params and metrics logged on
# the run afterwards are attached to that model too, so the experiment's Models tab compares the variants.
_logged_models: dict[str, str] = {}


def remember_logged_model(run_id: str, model_id: str) -> None:
    """From now on, params and metrics logged on the active run `run_id` go on logged model `model_id` too."""
    _logged_models[run_id] = model_id


def forget_logged_model(run_id: str) -> None:
    """The run ended: its logged model takes no more params or metrics through it."""
    _logged_models.pop(run_id, None)


def _active_model_id() -> str | None:
    run = mlflow.active_run()
    return _logged_models.get(run.info.run_id) if run else None


def str_params(params: dict) -> dict[str, str]:
    """Params as MLflow stores them: strings, None as ""."""
    return {k: "" if v is None else str(v) for k, v in params.items()}


# ---- on the active run -----------------------------------------------------------------------------------------------
def log_params(params: dict) -> None:
    """Log params on the active run, skipping keys it already has with the same value (under `mlflow run` the entry
    point's own parameters are on the run already, as the user typed them: "1000.0" for 1000, "data/x/" for
    data/x). A param already there with another value raises TrackingError: MLflow cannot change a param, and
    skipping it would leave the run saying what did not run."""
    run = mlflow.active_run()
    existing = client().get_run(run.info.run_id).data.params if run else {}
    conflicts = {k: v for k, v in str_params(params).items() if k in existing and not _same_param(existing[k], v)}
    if conflicts:
        raise TrackingError(f"run {run.info.run_id} already has " + "; ".join(
            f"param {k}={existing[k]!r}, not {v!r}" for k, v in conflicts.items()) + ": params cannot change")
    fresh = {k: ("" if v is None else v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
        model_id = _active_model_id()
        if model_id:
            client().log_model_params(model_id, str_params(fresh))


def _same_param(recorded: str, value: str) -> bool:
    """One value written two ways: the same text, number ("1000.0", "1000") or path ("data/x/", "data/x")."""
    if recorded == value:
        return True
    try:
        return float(recorded) == float(value)
    except ValueError:
        return bool(recorded) and bool(value) and os.path.normpath(recorded) == os.path.normpath(value)


def log_metrics(metrics: dict[str, float]) -> None:
    """Log on the active run; once the run has logged its model, the metrics are the model's too (`model_id`)."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, model_id=_active_model_id())


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_json(payload, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_bytes(data: bytes, artifact_file: str) -> None:
    """Log in-memory bytes (a PNG, say) under artifact_file, e.g. "plots/x.png"."""
    artifact = Path(artifact_file)
    with tempfile.TemporaryDirectory(prefix="ptqflow-artifact-") as d:
        local = Path(d) / artifact.name
        local.write_bytes(data)
        mlflow.log_artifact(str(local), str(artifact.parent) if str(artifact.parent) != "." else None)


def log_file(path: Path, artifact_dir: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_dir)


def log_dataset(features, targets, source: str, name: str, sha256: str, context: str,
                tags: dict[str, str] | None = None) -> None:
    """Log a numpy dataset as an input of the active run: `source` names its directory or file, MLflow profiles the
    arrays (shapes, sizes). MLflow's own numpy digest reads only the first values, so the digest is ours: SHA-256
    over all dataset files, cut to the 32 hex digits MLflow's dataset table stores; the full value goes in the
    input's tags (`sha256`, with `tags`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow notes that a local path matches two equivalent source types
        dataset = mlflow.data.from_numpy(features, source=source, targets=targets, name=name, digest=sha256[:32])
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags={**(tags or {}), "sha256": sha256})
            return
        except mlflow.exceptions.MlflowException as exc:
            # Two sweeps logging the same dataset at once race to insert its row; the loser's retry finds it.
            if attempt == 2 or not _is_duplicate_key(exc):
                raise
            time.sleep(0.2 * (attempt + 1))


def _is_duplicate_key(exc: Exception) -> bool:
    text = str(exc)
    return any(marker in text for marker in ("UniqueViolation", "UNIQUE constraint failed", "duplicate key",
                                              "IntegrityError"))


# ---- on a run by id: not the active run, or one that has ended -------------------------------------------------------
class DetachedRun:
    """A run written through the client by id: it never becomes the active run, so it can be the child of a run
    that has ended (a variant's run, after it logged its model). With `model_id`, metrics and params go on that
    logged model too, as log_metrics and log_params do on the active run."""

    def __init__(self, run_id: str, model_id: str | None = None):
        self.run_id = run_id
        self.model_id = model_id

    def log_params(self, params: dict) -> None:
        self.log(params=params)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.log(metrics=metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.log(tags=tags)

    def log(self, metrics: dict[str, float] | None = None, params: dict | None = None,
            tags: dict[str, str] | None = None) -> None:
        """Metrics (None values left out), params and tags in one batch."""
        from mlflow.entities import Metric as MlflowMetric
        from mlflow.entities import Param as MlflowParam
        from mlflow.entities import RunTag

        now = int(time.time() * 1000)
        params = str_params(params or {})
        try:
            client().log_batch(self.run_id, metrics=[MlflowMetric(k, float(v), now, 0, model_id=self.model_id)
                                                     for k, v in (metrics or {}).items() if v is not None],
                               params=[MlflowParam(k, v) for k, v in params.items()],
                               tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
            if self.model_id and params:
                client().log_model_params(self.model_id, params)
        except mlflow.exceptions.MlflowException as exc:
            raise refused_credentials(exc) or TrackingError(
                f"tracking server at {public_tracking_uri()} refused to log on run {self.run_id}: "
                f"{first_line(exc)}") from exc


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


def log_to_ended_run(run_id: str, model_uri: str | None, metrics: dict[str, float], params: dict,
                     tags: dict[str, str]) -> None:
    """Metrics, params and tags measured after a run ended (a sweep times its models together once all are made),
    on the run and on the MLflow logged model it logged (`model_uri` models:/<id>; else on the run only)."""
    model_id = model_uri.removeprefix("models:/") if model_uri and model_uri.startswith("models:/") else None
    DetachedRun(run_id, model_id).log(metrics, params, tags)


def log_params_to_run(run_id: str, params: dict) -> None:
    DetachedRun(run_id).log_params(params)


def log_metrics_to_run(run_id: str, metrics: dict[str, float]) -> None:
    DetachedRun(run_id).log_metrics(metrics)


def delete_run_tags(run_id: str, keys: list[str]) -> None:
    """Remove tags a later record contradicts (a contended flag after a quiet re-timing)."""
    for key in keys:
        try:
            client().delete_tag(run_id, key)
        except mlflow.exceptions.MlflowException as exc:
            raise refused_credentials(exc) or TrackingError(
                f"cannot delete tag {key} of run {run_id}: {first_line(exc)}") from exc


def log_bytes_to_run(run_id: str, data: bytes, artifact_file: str) -> None:
    """Log in-memory bytes under artifact_file (e.g. "diagnosis/layers.csv") on a run that need not be active."""
    artifact = Path(artifact_file)
    with tempfile.TemporaryDirectory(prefix="ptqflow-artifact-") as d:
        local = Path(d) / artifact.name
        local.write_bytes(data)
        try:
            client().log_artifact(run_id, str(local), str(artifact.parent) if str(artifact.parent) != "." else None)
        except mlflow.exceptions.MlflowException as exc:
            raise refused_credentials(exc) or TrackingError(
                f"cannot log {artifact_file} on run {run_id}: {first_line(exc)}") from exc


def log_text_to_run(run_id: str, text: str, artifact_file: str) -> None:
    log_bytes_to_run(run_id, text.encode(), artifact_file)


def log_json_to_run(run_id: str, payload, artifact_file: str) -> None:
    log_bytes_to_run(run_id, (json.dumps(payload, indent=2, default=str) + "\n").encode(), artifact_file)


# ---- read back -------------------------------------------------------------------------------------------------------
def download_text(run_id: str, artifact_path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_path}")


def download_artifact(run_id: str, artifact_path: str, destination: Path) -> Path:
    """One artifact file of a run, downloaded into destination; returns its local path."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(destination)))
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"cannot download {artifact_path} of run {run_id}: {first_line(exc)}") from exc
