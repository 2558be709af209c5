"""Registry aliases and the tags that record why an alias moved."""

from __future__ import annotations

import mlflow

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.tracking.keys import VersionTag
from ptqflow.tracking.connection import client, refused_credentials, tracking_uri


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
            f"cannot read @{alias} of {name} at {tracking_uri()}: {first_line(exc)}; the promotion gate "
            "does not decide without it") from exc


class AliasRace(TrackingError):
    """Another process pointed the same alias at a version at the same moment (MLflow's store reads whether the
    alias exists, then inserts it: of two such writers, one insert fails on the key)."""


# How the store's database words a second insert of the same key (PostgreSQL, MySQL, SQLite, through SQLAlchemy)
_DUPLICATE_KEY = ("UniqueViolation", "duplicate key value", "Duplicate entry", "UNIQUE constraint failed")


def is_concurrent_write(exc: Exception) -> bool:
    """Whether a registry request failed because another writer inserted the same key first."""
    return any(words in str(exc) for words in _DUPLICATE_KEY)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`. Raises AliasRace when another process set it at the same moment (read the alias
    again and decide again), TrackingError on any other failure."""
    try:
        client().set_registered_model_alias(name, alias, version)
    except mlflow.exceptions.MlflowException as exc:
        error = AliasRace if is_concurrent_write(exc) else TrackingError
        raise error(f"cannot point alias '{alias}' of {name} at version {version}: {first_line(exc)}") from exc


# How a decision sentence starts, by decision; record_decision replaces an earlier one that starts like these. Short:
# the registry's version list shows only the first 30-odd characters of a description.
_DECISION_OPENINGS = {"promoted": "Promoted to @{alias}",
                      "rejected": "Rejected",
                      "manual": "Manual decision"}


def decision_sentence(decision: str, reason: str, policy: str, alias: str = "champion") -> str:
    """The decision and its reason in a sentence, e.g. "Rejected: agreement 0.9500 is below 0.97. Gate: accuracy
    drop <= 0.5 pp, …"."""
    opening = _DECISION_OPENINGS.get(decision, f"Decision '{decision}'").format(alias=alias)
    sentence = f"{opening}: {reason.rstrip('.')}."
    if policy and policy != "none":
        sentence += f" Gate: {policy}."
    return sentence


def _is_decision(paragraph: str) -> bool:
    openings = [o.split("{")[0] for o in _DECISION_OPENINGS.values()] + ["Decision '"]
    return any(paragraph.startswith(o) and ": " in paragraph[:len(o) + 20] for o in openings)


def recorded_reason(tags: dict[str, str], description: str | None) -> str | None:
    """Why the gate decided as it did: the reason in the description's decision sentence (or, for versions
    registered before that sentence existed, their `promotion_reason` tag); None when nothing was decided."""
    first = (description or "").split("\n\n")[0]
    if _is_decision(first):
        reason = first.split(": ", 1)[1]
        return reason.split(" Gate: ", 1)[0].rstrip(".")
    return tags.get(VersionTag.PROMOTION_REASON)


def record_decision(name: str, version: str, decision: str, reason: str, policy: str,
                    alias: str = "champion") -> None:
    """Record why an alias moved (or did not): the `promotion_decision` tag, and the decision with its reason as
    the first sentence of the version's description (replacing an earlier decision, keeping the rest). Reason and
    policy go into that sentence only: a tag would be cut off in the registry's version list."""
    c = client()
    try:
        c.set_model_version_tag(name, version, VersionTag.PROMOTION_DECISION, decision)
        paragraphs = (c.get_model_version(name, version).description or "").split("\n\n")
        rest = [p for p in paragraphs if p.strip() and not _is_decision(p)]
        description = "\n\n".join([decision_sentence(decision, reason, policy, alias), *rest])
        c.update_model_version(name, version, description=description)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"cannot record the {decision} decision on {name} version {version}: "
            f"{first_line(exc)}") from exc


def list_registered(names_like: str | None = None) -> list[dict]:
    """Every registered model with its versions' tags and aliases, newest version first."""
    c = client()
    try:
        models = c.search_registered_models(f"name LIKE '{names_like}'" if names_like else None)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"cannot list registered models at {tracking_uri()}: "
                            f"{first_line(exc)}") from exc
    listing = []
    for model in models:
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        versions = c.search_model_versions(f"name = '{model.name}'")
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            listing.append({"name": model.name, "version": str(mv.version), "tags": dict(mv.tags),
                            "aliases": sorted(aliases_by_version.get(str(mv.version), [])),
                            "created": mv.creation_timestamp, "run_id": mv.run_id,
                            "description": mv.description or ""})
    return listing
