"""Installed versions of the packages whose code shapes a result, for cache keys, resume keys and run tags."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

NOT_INSTALLED = "not installed"


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Name → installed version, or "not installed"."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions
