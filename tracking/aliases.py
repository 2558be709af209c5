"""Registry aliases and the tags that record why an alias moved."""

from __future__ import annotations

import mlflow

from pipelines.errors import TrackingError
from tracking.keys import VersionTag
from tracking.runs import client, refused_credentials, tracking_uri


def alias_target(name: str, alias: str):
    """The ModelVersion the alias points to, or None when the model or the alias does not exist. Any other failure
    (permission, a server error) raises: a gate that read it as "no champion yet" would crown anything."""
    c = client()
    try:
        # Searching first: a basic-auth server answers 403, not "not found", for an alias of a model that does not
        # exist yet, and that must not read as a permission problem.
        if not c.search_registered_models(filter_string=f"name = '{name}'"):
            return None
        return c.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (  # no such model / no such alias (MLflow's own words)
                exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in exc.message):
            return None
        raise refused_credentials(exc) or TrackingError(
            f"cannot read @{alias} of {name} at {tracking_uri()}: {exc.message.splitlines()[0]}; the promotion gate "
            "does not decide without it") from exc


def set_alias(name: str, alias: str, version: str) -> None:
    try:
        client().set_registered_model_alias(name, alias, version)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot point alias '{alias}' of {name} at version {version}: "
                            f"{exc.message.splitlines()[0]}") from exc


def record_decision(name: str, version: str, decision: str, reason: str, policy: str) -> None:
    c = client()
    for key, value in ((VersionTag.PROMOTION_DECISION, decision), (VersionTag.PROMOTION_REASON, reason),
                       (VersionTag.PROMOTION_POLICY, policy)):
        c.set_model_version_tag(name, version, key, value)


def list_registered(names_like: str | None = None) -> list[dict]:
    """Every registered model with its versions' tags and aliases, newest version first."""
    c = client()
    try:
        models = c.search_registered_models(f"name LIKE '{names_like}'" if names_like else None)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot list registered models at {tracking_uri()}: "
                            f"{exc.message.splitlines()[0]}") from exc
    listing = []
    for model in models:
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        versions = c.search_model_versions(f"name = '{model.name}'")
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            listing.append({"name": model.name, "version": str(mv.version), "tags": dict(mv.tags),
                            "aliases": sorted(aliases_by_version.get(str(mv.version), [])),
                            "created": mv.creation_timestamp})
    return listing
