"""Experiments: open (or create) one by name, mark it as MLflow's "Model training" kind with ptqflow's saved
runs-table view, and the MLflow UI links to it."""

from __future__ import annotations

import json
import time

import mlflow

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.tracking.connection import client, public_tracking_uri, refused_credentials, sqlite_setup_lock
from ptqflow.tracking.keys import ExperimentTag, Metric, Param


def ensure_experiment(name: str) -> str:
    with sqlite_setup_lock():  # the first call that opens the store
        return _ensure_experiment(name)


def _ensure_experiment(name: str) -> str:
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            try:
                return mlflow.create_experiment(name)
            except mlflow.exceptions.MlflowException as exc:
                # Another sweep created it between our lookup and create: use theirs.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" or mlflow.get_experiment_by_name(name) is None:
                    raise
                experiment = mlflow.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment '{name}' is deleted; restore it in the MLflow UI or pass --experiment")
        return experiment.experiment_id
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to open experiment '{name}': "
            f"{first_line(exc)}") from exc


# ---- how the experiment opens in the MLflow UI -----------------------------------------------------------------------
# The runs-table columns of ptqflow's saved view, in order, with widths that fit their names (about 1,600 px with
# the columns the table always shows: run name, created, duration).
RUNS_VIEW_COLUMNS = {
    "attributes.`Models`": 165,
    f"metrics.`{Metric.ACCURACY}`": 90, f"metrics.`{Metric.ACCURACY_DELTA_PP}`": 140,
    f"metrics.`{Metric.TOP1_AGREEMENT}`": 125, f"metrics.`{Metric.LATENCY_MS_B1_P50}`": 145,
    f"metrics.`{Metric.MODEL_SIZE_BYTES}`": 140, f"params.`{Param.WEIGHT_DTYPE}`": 115,
}
RUN_NAME_COLUMN_WIDTH = 345  # fits "resnet8 · 2026-12-01 23:40:05 · 10000 imgs"
DEFAULT_UI_URL = "http://127.0.0.1:5000/"  # where `mlflow ui` serves a local (sqlite or file) store by default


def runs_view() -> str:
    """ptqflow's runs-table view as the MLflow 3.17 UI saves one ("Views" > "Save view"): a JSON envelope whose
    `state` holds the table's UI state. Widths apply only to the columns named in columnOrder."""
    state = {"selectedColumns": list(RUNS_VIEW_COLUMNS),
             "columnWidths": {"attributes.`Run Name`": RUN_NAME_COLUMN_WIDTH, **RUNS_VIEW_COLUMNS},
             "columnOrder": ["0", "attributes.`Run Name`", "runDateAndNestInfo", "duration", *RUNS_VIEW_COLUMNS]}
    now = int(time.time() * 1000)
    return json.dumps({"name": ExperimentTag.RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now,
                       "state": json.dumps(state)})


def mark_experiment(experiment_id: str) -> None:
    """Mark the experiment as MLflow's "Model training" kind and save ptqflow's runs-table view on it; tags the
    experiment already has (set by the user or an earlier sweep) are left as they are."""
    c = client()
    wanted = {ExperimentTag.KIND: ExperimentTag.KIND_MODEL_DEVELOPMENT,
              ExperimentTag.SAVED_VIEW_PREFIX + ExperimentTag.RUNS_VIEW_ID: runs_view()}
    try:
        tags = c.get_experiment(experiment_id).tags
        for key, value in wanted.items():
            if key in tags:
                continue
            try:
                c.set_experiment_tag(experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                # Two sweeps starting together both find the tag missing; on a SQL store the second insert then
                # violates the tag's primary key. The tag being there now is all this step wants.
                if key not in c.get_experiment(experiment_id).tags:
                    raise
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to tag experiment {experiment_id}: "
            f"{first_line(exc)}") from exc


def ui_base_url() -> str:
    """The MLflow UI's address: the tracking server when it is one (without credentials), else `mlflow ui`'s."""
    uri = public_tracking_uri()
    return uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


def experiment_route(experiment_id: str, tab: str = "runs") -> str:
    """The UI route (after the `#`) of an experiment tab in the "Model training" view; the runs tab with
    ptqflow's saved columns. MLflow 3.17 opens experiments in its GenAI view unless the route says otherwise."""
    route = f"/experiments/{experiment_id}/{tab}?workflowType=machine_learning"
    return route + (f"&viewStateShareKey={ExperimentTag.RUNS_VIEW_ID}" if tab == "runs" else "")


def experiment_page(experiment_id: str) -> str:
    """The experiment's runs table in the "Model training" view with ptqflow's saved columns."""
    return f"{ui_base_url()}#{experiment_route(experiment_id)}"
