"""Models a run logs: a TorchScript module or an ONNX file as an MLflow logged model linked to the active run (its
files downloaded back, so what is hashed and evaluated is the stored copy), and the URI that registers a run's
model."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.tracking.connection import client, public_tracking_uri, refused_credentials
from ptqflow.tracking.keys import Artifact
from ptqflow.tracking.records import remember_logged_model, str_params


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
ORT_ENABLE_ALL = 99  # onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL, as the onnx flavor takes it


def _signature(input_example, output_example):
    from mlflow.models import infer_signature

    return infer_signature(input_example, output_example)


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
            pip_requirements=pip_requirements, params=str_params(params)))
    return _downloaded(info, download_dir, TORCHSCRIPT_FILE_IN_MODEL)


def log_onnx_model(onnx_path: Path, name: str, download_dir: Path, input_example, output_example,
                   pip_requirements: list[str], params: dict, session_threads: int = 0) -> LoggedModel:
    """Log an ONNX file (external data inlined) as an MLflow logged model (onnx flavor, CPU execution provider),
    like log_torchscript_model. `session_threads` (0: none) become the MLmodel's onnxruntime session options, which
    MLflow's onnx flavor applies when it loads the model: intra-op threads, one inter-op thread, every graph
    optimization."""
    import mlflow.onnx
    import onnx

    options = ({"intra_op_num_threads": session_threads, "inter_op_num_threads": 1,
                "graph_optimization_level": ORT_ENABLE_ALL} if session_threads else None)
    info = _log_model(lambda: mlflow.onnx.log_model(
        onnx.load(str(onnx_path)), name=name, signature=_signature(input_example, output_example),
        input_example=input_example, pip_requirements=pip_requirements, save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"], onnx_session_options=options,
        params=str_params(params)))
    return _downloaded(info, download_dir, ONNX_FILE_IN_MODEL)


def _log_model(log):
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("a model is logged only inside a run")
    try:
        info = log()
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to log a model: {first_line(exc)}") from exc
    remember_logged_model(run.info.run_id, info.model_id)
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
