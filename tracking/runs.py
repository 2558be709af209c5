"""Runs: start and end them with the right status, and log params, metrics, tags, artifacts and models.

Only the `tracking` package imports mlflow. Runs end FINISHED on success, KILLED on Ctrl-C or SIGTERM and FAILED on
any other exception, so a sweep never leaves a run RUNNING.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ptqflow.common.errors import TrackingError  # noqa: E402
from ptqflow.common.interrupts import checkpoint  # noqa: E402
from ptqflow.tracking.keys import Artifact, ExperimentTag, Metric, Param, Tag  # noqa: E402

# MLflow's INFO lines (database migrations, "registered model") would bury ptqflow's own one-line messages.
logging.getLogger("mlflow").setLevel(logging.WARNING)

# Run id -> id of the MLflow logged model logged on that run (while the run is open): params and metrics logged on
# the run afterwards are attached to that model too, so the experiment's Models tab compares the variants.
_logged_models: dict[str, str] = {}


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient()


def public_tracking_uri() -> str:
    """The tracking URI without any user:password@ part, for messages."""
    return without_credentials(tracking_uri())


def without_credentials(uri: str) -> str:
    """`uri` without any user:password@ part (a tracking server's, a tune study's database), for params and
    messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


def refused_credentials(exc: Exception) -> TrackingError | None:
    """The one-line error for a server's HTTP 401/403 (MLflow raises a plain MlflowException with error_code
    UNAUTHENTICATED or PERMISSION_DENIED), naming the user but never the password; None for any other error."""
    code = getattr(exc, "error_code", None)
    status = exc.get_http_status_code() if isinstance(exc, mlflow.exceptions.MlflowException) else None
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED") and status not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none)"
    if code == "PERMISSION_DENIED" or status == 403:
        return TrackingError(f"tracking server refused the credentials for user {user} at {public_tracking_uri()} "
                             "(HTTP 403: no permission for this request); ask the server's admin for access")
    return TrackingError(f"tracking server refused the credentials for user {user} at {public_tracking_uri()} "
                         "(HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it")


def one_line(exc: Exception) -> str:
    """An MlflowException's message cut to its first line."""
    message = getattr(exc, "message", None) or str(exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


@contextmanager
def sqlite_setup_lock():
    """MLflow creates a new sqlite store's tables (and upgrades an old one) on first use in each process; two
    sweeps doing that at once crash ("duplicate column", "database is locked"). On a sqlite store, hold an
    inter-process lock around that first use; a process that has to wait says so on stderr, in one line."""
    db = _sqlite_file(tracking_uri())
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    import hashlib
    import sys

    lock_path = Path(tempfile.gettempdir()) / f"ptqflow-sqlite-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish setting up the sqlite store {db}", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
            f"tracking server at {public_tracking_uri()} refused to open experiment '{name}': {one_line(exc)}") from exc


def process_tags() -> dict[str, str]:
    return {Tag.PID: str(os.getpid()), Tag.HOST: socket.gethostname()}


@contextmanager
def run_scope(experiment_id: str | None = None, run_name: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None):
    """Start (or, under `mlflow run`, resume) a run; end it FINISHED, KILLED or FAILED. Yields the run id.

    With `parent_run_id` the run is that run's child whether or not the parent is this process's active run (a tune
    worker's trials belong to a parent run another machine started). Every run carries this process's pid and host
    from its first moment, so a later sweep can tell a run whose process was killed (and mark it FAILED) however
    early the kill came."""
    checkpoint()  # a stop requested before this run began: do not begin it
    creation_tags = {**process_tags(), **(tags or {})}
    active = mlflow.active_run()
    try:
        if parent_run_id and (active is None or active.info.run_id != parent_run_id):
            # Created through the client with its parent tag, then made active: fluent start_run(parent_run_id=)
            # wants the parent to be the active run.
            created = _create_run(experiment_id, run_name, {**creation_tags, Tag.MLFLOW_PARENT: parent_run_id})
            run = mlflow.start_run(run_id=created.info.run_id, nested=active is not None)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                   nested=nested or parent_run_id is not None, tags=creation_tags)
        if run.data.tags.get(Tag.PID) != creation_tags[Tag.PID]:  # resumed (`mlflow run`): start_run ignored tags
            mlflow.set_tags(creation_tags)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to start a run: {one_line(exc)}") from exc
    def end(status: str) -> None:
        _logged_models.pop(run.info.run_id, None)
        mlflow.end_run(status)

    with _ending(end):
        yield run.info.run_id


@contextmanager
def _ending(end):
    """Call end(status) when the block leaves: FINISHED, KILLED on Ctrl-C (and SIGTERM, which raises it), FAILED on
    any other exception."""
    status = RunStatus.FINISHED
    try:
        yield
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        end(RunStatus.to_string(status))


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
        params = _str_params(params or {})
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
                f"{one_line(exc)}") from exc


def _create_run(experiment_id: str, run_name: str, tags: dict[str, str]):
    """A new run created through the client (never made active here); a refusal is one TrackingError line."""
    try:
        return client().create_run(experiment_id, run_name=run_name, tags=tags)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to start a run: {one_line(exc)}") from exc


@contextmanager
def child_run(parent_run_id: str, run_name: str, tags: dict[str, str] | None = None):
    """A new run under `parent_run_id` (active or ended), in its experiment, written through the client; the active
    run stays as it is. Ends FINISHED, KILLED (Ctrl-C) or FAILED like run_scope, and carries this process's pid and
    host. Yields a DetachedRun."""
    checkpoint()
    parent = get_run(parent_run_id)
    run = _create_run(parent.info.experiment_id, run_name,
                      {**process_tags(), **(tags or {}), Tag.MLFLOW_PARENT: parent_run_id})
    with _ending(lambda status: client().set_terminated(run.info.run_id, status)):
        yield DetachedRun(run.info.run_id)


def log_params(params: dict) -> None:
    """Log params on the active run, skipping keys it already has: under `mlflow run` the entry point's own
    parameters are on the run already, and MLflow refuses to change a param's value."""
    run = mlflow.active_run()
    existing = client().get_run(run.info.run_id).data.params if run else {}
    fresh = {k: ("" if v is None else v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
        model_id = _active_model_id()
        if model_id:
            client().log_model_params(model_id, _str_params(fresh))


def log_metrics(metrics: dict[str, float]) -> None:
    """Log on the active run; once the run has logged its model, the metrics are the model's too (`model_id`)."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, model_id=_active_model_id())


def _active_model_id() -> str | None:
    run = mlflow.active_run()
    return _logged_models.get(run.info.run_id) if run else None


def _str_params(params: dict) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in params.items()}


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


def log_model_dir(model_dir: Path) -> str:
    """Upload a saved MLflow model dir to the active run as plain artifacts; returns the runs:/ URI that registers
    it. The sweep logs MLflow logged models instead (log_torchscript_model, log_onnx_model)."""
    mlflow.log_artifacts(str(model_dir), Artifact.LOGGED_MODEL_NAME)
    return f"runs:/{mlflow.active_run().info.run_id}/{Artifact.LOGGED_MODEL_NAME}"


@dataclass(frozen=True)
class LoggedModel:
    """An MLflow logged model of the active run, and its files as the artifact store holds them."""

    model_id: str
    model_uri: str  # models:/<model_id>: what the registry registers
    local_dir: Path  # the logged model's files, downloaded back from the artifact store
    model_file: Path  # the model file inside local_dir (byte for byte the stored one)

    @property
    def model_file_in_model(self) -> str:
        return self.model_file.relative_to(self.local_dir).as_posix()


TORCHSCRIPT_FILE_IN_MODEL = "data/model.pth"  # where mlflow.pytorch writes a pickled (TorchScript) module
ONNX_FILE_IN_MODEL = "model.onnx"


def log_torchscript_model(script_module, name: str, download_dir: Path, input_example, output_example,
                          pip_requirements: list[str], params: dict) -> LoggedModel:
    """Log a TorchScript module as an MLflow logged model (pytorch flavor, signature, input example) named `name`,
    linked to the active run, with `params`; metrics and params logged on the run afterwards are attached to it.
    Returns it with its files downloaded into download_dir: hash and evaluate that file, it is the stored one."""
    import mlflow.pytorch

    # MLflow warns that pickle formats run code on load; TorchScript has no safer format, and pull checks SHA-256.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # MLflow loads the saved model once to check the input example, with torch.load on a TorchScript archive:
        # torch says to call torch.jit.load instead, which says it is deprecated. Neither is about ptqflow's file.
        warnings.filterwarnings("ignore", message=".*torch.load' received a zip file")
        warnings.filterwarnings("ignore", message=".*torch.jit.load` is deprecated")
        info = _log_model(lambda: mlflow.pytorch.log_model(
            script_module, name=name, serialization_format="pickle",
            signature=_signature(input_example, output_example), input_example=input_example,
            pip_requirements=pip_requirements, params=_str_params(params)))
    return _downloaded(info, download_dir, TORCHSCRIPT_FILE_IN_MODEL)


def log_onnx_model(onnx_path: Path, name: str, download_dir: Path, input_example, output_example,
                   pip_requirements: list[str], params: dict) -> LoggedModel:
    """Log an ONNX file (external data inlined) as an MLflow logged model (onnx flavor, CPU execution provider),
    like log_torchscript_model."""
    import mlflow.onnx
    import onnx

    info = _log_model(lambda: mlflow.onnx.log_model(
        onnx.load(str(onnx_path)), name=name, signature=_signature(input_example, output_example),
        input_example=input_example, pip_requirements=pip_requirements, save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"], params=_str_params(params)))
    return _downloaded(info, download_dir, ONNX_FILE_IN_MODEL)


def _log_model(log):
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("a model is logged only inside a run")
    try:
        info = log()
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to log a model: {one_line(exc)}") from exc
    _logged_models[run.info.run_id] = info.model_id
    return info


def _downloaded(info, download_dir: Path, file_in_model: str) -> LoggedModel:
    download_dir.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(download_dir)))
    model_file = local / file_in_model
    if not model_file.is_file():
        raise TrackingError(f"logged model {info.model_id} has no {file_in_model}")
    return LoggedModel(info.model_id, info.model_uri, local, model_file)


def logged_model_uri(run) -> str | None:
    """The URI that registers the model a finished variant run logged: its MLflow logged model (`models:/<id>`), or
    for a run from before logged models, its `model/` artifact dir; None when it has neither."""
    outputs = getattr(run, "outputs", None)
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else []) or []]
    if not model_ids:
        found = client().search_logged_models([run.info.experiment_id],
                                              filter_string=f"source_run_id = '{run.info.run_id}'", max_results=10)
        model_ids = [m.model_id for m in found]
    if model_ids:
        return f"models:/{model_ids[-1]}"
    if any(a.path == Artifact.LOGGED_MODEL_NAME for a in client().list_artifacts(run.info.run_id)):
        return f"runs:/{run.info.run_id}/{Artifact.LOGGED_MODEL_NAME}"
    return None


# ---- how the experiment opens in the MLflow UI --------------------------------------------------------------------
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
            f"{one_line(exc)}") from exc


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


def download_artifact(run_id: str, artifact_path: str, destination: Path) -> Path:
    """One artifact file of a run, downloaded into destination; returns its local path."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(destination)))
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"cannot download {artifact_path} of run {run_id}: {one_line(exc)}") from exc


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
                f"cannot log {artifact_file} on run {run_id}: {one_line(exc)}") from exc


def latest_sweep_run_id(experiment: str) -> str:
    experiment_obj = mlflow.get_experiment_by_name(experiment)
    if experiment_obj is None:
        raise TrackingError(f"no experiment '{experiment}' at {tracking_uri()}; run `ptqflow sweep` first")
    runs = client().search_runs([experiment_obj.experiment_id], f"tags.`{Tag.ROLE}` = '{Tag.ROLE_SWEEP}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"experiment '{experiment}' has no sweep run yet; run `ptqflow sweep` first")
    return runs[0].info.run_id


def log_bench_to_run(run_id: str, bench) -> None:
    """Latency/throughput numbers from `ptqflow bench` on an existing run, under the sweep's metric names."""
    from ptqflow.tracking.keys import Metric, Param

    c = client()
    for key, value in ((Metric.LATENCY_MS_B1_P50, bench.latency_ms_b1_p50),
                       (Metric.LATENCY_MS_B1_P90, bench.latency_ms_b1_p90),
                       (Metric.THROUGHPUT_IPS_B256, bench.throughput_ips_b256)):
        c.log_metric(run_id, key, value)
    try:
        c.log_param(run_id, Param.BENCH_THREADS, bench.threads)
    except mlflow.exceptions.MlflowException:
        pass  # already logged by the sweep with the same or another thread count; params cannot change


# ---- runs no process holds active: a tune study's parent run, shared by workers on several machines ----------
def sqlite_file(uri: str) -> Path | None:
    """The sqlite file of a `sqlite:///` tracking URI, else None."""
    return _sqlite_file(uri)


@contextmanager
def detached_run(experiment_id: str, run_name: str, tags: dict[str, str] | None = None):
    """A new top-level run written through the client, left RUNNING when the block ends (other processes log under
    it and end it: `terminate`); FAILED when the block raises. Yields a DetachedRun. It carries no pid tag: no one
    process owns it, so ptqflow.tracking.recovery never takes it for an orphan of the process that started it."""
    checkpoint()
    run = _create_run(experiment_id, run_name, {Tag.HOST: socket.gethostname(), **(tags or {})})
    try:
        yield DetachedRun(run.info.run_id)
    except BaseException:
        client().set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise


def terminate(run_id: str, status: str) -> None:
    """End a run FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status)


def runs_tagged(experiment_id: str, key: str, value: str) -> list:
    """The runs of an experiment whose tag `key` is `value`."""
    return client().search_runs([experiment_id], f"tags.`{key}` = '{value}'", max_results=1000)


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


def log_text_to_run(run_id: str, text: str, artifact_file: str) -> None:
    log_bytes_to_run(run_id, text.encode(), artifact_file)


def log_json_to_run(run_id: str, payload, artifact_file: str) -> None:
    log_bytes_to_run(run_id, (json.dumps(payload, indent=2, default=str) + "\n").encode(), artifact_file)


def reopen(run_id: str) -> None:
    """Set an ended run RUNNING again (a tune study taken up again logs more trials under its parent)."""
    client().update_run(run_id, status="RUNNING")
