"""The MLflow model registry: create versions (never overwrite), resolve a version or alias, download files."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import mlflow

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.tracking.connection import client, refused_credentials, tracking_uri


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    tags: dict[str, str]
    run_id: str | None
    aliases: tuple[str, ...]


def register(model_uri: str, name: str, tags: dict[str, str], description: str | None = None,
             model_description: str | None = None) -> RegisteredVersion:
    """A new version of `name`; the registry numbers versions itself, so an existing one is never replaced.
    `model_description` is written only by the call that creates the registered model: a description someone
    wrote on it since stays. Called only after the model's artifacts are fully uploaded."""
    try:
        if model_description:
            _create_registered_model(name, model_description)
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints its own "Successfully registered" lines
            version = mlflow.register_model(model_uri, name, tags=tags)
        if description:
            client().update_model_version(name, version.version, description=description)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"registry at {tracking_uri()} refused to register '{name}': {first_line(exc)}") from exc
    return RegisteredVersion(name, str(version.version), dict(tags), version.run_id, ())


def _create_registered_model(name: str, description: str) -> bool:
    """Create `name` with `description`; False when it exists already (made earlier, or by another sweep a moment
    ago), its description then left as it is."""
    try:
        client().create_registered_model(name, description=description)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def resolve(name: str, version: str | None = None, alias: str | None = None) -> RegisteredVersion:
    """The version given by number or alias; a clear TrackingError when it does not exist."""
    if (version is None) == (alias is None):
        raise TrackingError("give exactly one of --version or --alias (or NAME@ALIAS)")
    c = client()
    try:
        mv = c.get_model_version(name, version) if version is not None else c.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        refused = refused_credentials(exc)
        if refused:
            raise refused from exc
        which = f"version {version}" if version is not None else f"alias '{alias}'"
        raise TrackingError(f"registered model '{name}' has no {which} at {tracking_uri()}; "
                            "`mlflow ui` lists what exists") from exc
    return RegisteredVersion(mv.name, str(mv.version), dict(mv.tags), mv.run_id, tuple(mv.aliases or ()))


def download(version: RegisteredVersion, destination: Path) -> Path:
    """Download the registered model's files into destination; returns the model directory."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                    dst_path=str(destination))
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"cannot download {version.name} version {version.version}: {first_line(exc)}") from exc
    return Path(local)


def source_model_digests(name: str) -> set[str]:
    """SHA-256 of the FP32 model each version of `name` was quantized from (from the version's tag, or for versions
    registered before that tag existed, from its source run); empty when `name` does not exist."""
    from ptqflow.tracking.keys import Tag, VersionTag

    c = client()
    try:
        versions = c.search_model_versions(f"name = '{name}'")
        digests = set()
        for mv in versions:
            digest = (mv.tags or {}).get(VersionTag.FP32_MODEL_SHA256)
            if digest is None and mv.run_id:
                digest = _run_tag(c, mv.run_id, Tag.MODEL_SHA256)
            if digest:
                digests.add(digest)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"cannot read the versions of '{name}' at {tracking_uri()}: {first_line(exc)}") from exc
    return digests


def _run_tag(c, run_id: str, key: str) -> str | None:
    try:
        return c.get_run(run_id).data.tags.get(key)
    except mlflow.exceptions.MlflowException:  # the source run was deleted: nothing recorded to go by
        return None
