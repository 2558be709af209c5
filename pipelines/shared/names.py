"""Check user-supplied names (experiments, registered models, variants, aliases) and output directories.

Names end up in MLflow URLs (`models:/NAME@ALIAS`), file paths and HTML reports, so only a small, boring alphabet is
accepted: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters, and never
'..'. Anything else is one ConfigError line that shows the offending value escaped (control characters included).
Only the standard library is imported, so the CLI can use this module without slowing down `--help`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ptqflow.common.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_NAME_LENGTH = 100
ALLOWED_TEXT = ("1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit and without '..'")


def _shown(value: object, limit: int = 120) -> str:
    """The value as a single escaped line, shortened if long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_name(kind: str, value: str) -> str:
    """Return value unchanged if it is a safe name, else raise ConfigError naming kind, value and the rule.

    kind is what the user passed, e.g. "--experiment" or "variant name"; it starts the error message.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be text, got {type(value).__name__}: use {ALLOWED_TEXT}")
    if not value:
        raise ConfigError(f"{kind} is empty: use {ALLOWED_TEXT}")
    if NAME_PATTERN.fullmatch(value) is None or ".." in value:
        raise ConfigError(f"{kind} {_shown(value)} is not allowed: use {ALLOWED_TEXT}")
    return value


def validate_output_dir(path: Path | str) -> Path:
    """Return path as a Path if it can serve as an output directory: missing (it will be created) or an existing
    real directory. A symlink (even to a directory) or an existing non-directory is refused with a ConfigError."""
    text = str(path)
    if not text or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ConfigError(f"--output {_shown(text)} is not a usable directory name (empty or control characters)")
    path = Path(path)
    try:
        is_symlink, exists, is_dir = path.is_symlink(), path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # name too long, permission denied on a parent
        raise ConfigError(f"--output {_shown(text)} cannot be checked ({type(exc).__name__}); "
                          "pass another directory") from exc
    if is_symlink:
        raise ConfigError(f"--output {_shown(text)} is a symlink; pass a real directory (or a new path) instead")
    if exists and not is_dir:
        raise ConfigError(f"--output {_shown(text)} exists and is not a directory; pass a directory or a new path")
    return path


def validate_alias(value: str) -> str:
    """Registry aliases: MLflow allows only word characters and '-', and reserves 'latest' and 'v<digits>'."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", value) \
            or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ConfigError(f"alias {value!r} is not allowed: use letters, digits, '_' or '-' (not 'latest' or "
                          "'v<number>')")
    return value


@dataclass(frozen=True)
class VersionRef:
    """A registered model version as a user names it: NAME/VERSION, NAME@ALIAS, or (where allowed) NAME alone."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return self.name + (f"/{self.version}" if self.version else f"@{self.alias}" if self.alias else "")


def names_a_version(text: str) -> bool:
    """Whether `text` has the form NAME/VERSION or NAME@ALIAS (rather than a run id or a file)."""
    return "/" in text or "@" in text


def parse_version_ref(text: str, bare_name: bool = False) -> VersionRef:
    """NAME/VERSION, NAME@ALIAS, and with `bare_name` NAME alone, checked (validate_name, validate_alias); anything
    else is one ConfigError line."""
    name, sep, rest = text.partition("/") if "/" in text else text.partition("@")
    forms = "NAME/VERSION or NAME@ALIAS" + (" or NAME" if bare_name else "")
    if not name or (sep and not rest) or (not sep and not bare_name):
        raise ConfigError(f"{_shown(text)} does not name a registered model version: use {forms}")
    validate_name("registered model name", name)
    if sep == "@":
        return VersionRef(name, alias=validate_alias(rest))
    return VersionRef(name, version=rest or None)


def version_ref(text: str, version: str | None = None, alias: str | None = None) -> VersionRef:
    """The version a command names: NAME/VERSION, NAME@ALIAS, or NAME with its --version or --alias option, each
    checked; a version or alias given twice, differently, is a ConfigError."""
    parsed = parse_version_ref(text, bare_name=True)
    for kind, in_text, option in (("alias", parsed.alias, alias), ("version", parsed.version, version)):
        if in_text and option and in_text != option:
            raise ConfigError(f"{text} names {kind} '{in_text}' but --{kind} says '{option}'")
    alias = alias or parsed.alias
    if alias:
        validate_alias(alias)
    return VersionRef(parsed.name, version or parsed.version, alias)


# Default registered names: `<model file stem><suffix>`. Fully quantized variants go to the int8 names; `-mixed`
# variants (layers upgraded to FP32 or 16 bits by the fallback) to names of their own, never to the int8 ones.
PYTORCH_SUFFIX = "-int8"
ONNX_SUFFIX = "-int8-onnx"
MIXED_PYTORCH_SUFFIX = "-mixed"
MIXED_ONNX_SUFFIX = "-mixed-onnx"
MIXED_EXPLICIT_SUFFIX = "-mixed"  # after a name the user chose: --registered-model NAME puts -mixed ones in NAME-mixed
# The default experiment: `<model file stem>-quantization` (resnet8-quantization for resnet8.onnx, its old name)
EXPERIMENT_SUFFIX = "-quantization"


def registered_name_for(model_path: Path, suffix: str) -> str:
    """The default registered-model name for a model file: its stem made safe, plus `suffix`
    (`resnet8.onnx` → `resnet8-int8`), so models of different files never share a registry entry by default."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_path).stem)
    stem = re.sub(r"\.{2,}", ".", stem).strip("-._") or "model"
    return stem[:MAX_NAME_LENGTH - len(suffix)].rstrip("-._") + suffix


def mixed_name_for(name: str) -> str:
    """Where the `-mixed` variants go when the user named the int8 ones `name`: `name-mixed`, within the length."""
    return name[:MAX_NAME_LENGTH - len(MIXED_EXPLICIT_SUFFIX)].rstrip("-._") + MIXED_EXPLICIT_SUFFIX


def experiment_name_for(model_path: Path) -> str:
    """The default experiment of a model file: `<stem>-quantization` (`resnet8.onnx` → `resnet8-quantization`), so
    sweeps of different models land apart, as their registered names do."""
    return registered_name_for(model_path, EXPERIMENT_SUFFIX)
