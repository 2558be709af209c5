"""Option groups: options declared once, as the fields of a frozen dataclass, and taken whole by every command that
runs that part of the work, so two commands cannot offer the same part with different options.

`takes_groups` flattens the groups' fields into a command's signature, which Typer reads (it takes a callback's
`__signature__` and `__annotations__` as they are), and rebuilds the group objects when the command runs."""

from __future__ import annotations

import inspect
import typing
from dataclasses import Field, field, fields
from functools import wraps
from typing import Any, Callable, ClassVar

# Commands that run a single framework leave out the options of the other one (a field's metadata names its framework).
PYTORCH = "pytorch"
ONNXRUNTIME = "onnxruntime"
_FRAMEWORK = "ptqflow.cli.framework"


def only_for(framework: str, default: Any) -> Any:
    """A group field that only commands running `framework` (or both frameworks) offer."""
    return field(default=default, metadata={_FRAMEWORK: framework})


class OptionGroup:
    """Base of the option groups (frozen dataclasses whose fields carry `Annotated[..., typer.Option(...)]`)."""

    # option field -> SweepOptions field, where the names differ
    SWEEP_NAMES: ClassVar[dict[str, str]] = {}

    def sweep_fields(self) -> dict[str, Any]:
        """The SweepOptions fields this group sets (renamed by SWEEP_NAMES)."""
        return {self.SWEEP_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}


class OptionGroups:
    """The group objects a command was given."""

    def __init__(self, groups: tuple[OptionGroup, ...]):
        self._groups = groups

    def sweep_fields(self) -> dict[str, Any]:
        """Every group's SweepOptions fields together."""
        merged: dict[str, Any] = {}
        for group in self._groups:
            for name, value in group.sweep_fields().items():
                if name in merged:
                    raise TypeError(f"two option groups set SweepOptions.{name}")
                merged[name] = value
        return merged


def _offered_fields(group: type, framework: str | None) -> list[Field]:
    """The fields of `group` a command offers: all of them, or, for a single-framework command, those that are not
    the other framework's."""
    return [f for f in fields(group) if framework is None or f.metadata.get(_FRAMEWORK) in (None, framework)]


def takes_groups(*groups: type, framework: str | None = None) -> Callable:
    """Decorator: the command's parameter annotated `OptionGroups` becomes the groups' options, in its place and in
    field order; the command receives the rebuilt group objects there. `framework` limits the options to those of
    one framework (the others keep their defaults)."""

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
               for p in inspect.signature(command).parameters.values()]
        slot = next(i for i, p in enumerate(own) if p.annotation is OptionGroups)
        offered = {group: _offered_fields(group, framework) for group in groups}
        flattened = [_parameter(group, f) for group, group_fields in offered.items() for f in group_fields]
        parameters = [*own[:slot], *flattened, *own[slot + 1:]]
        names = [p.name for p in parameters]
        if len(names) != len(set(names)):
            raise TypeError(f"{command.__name__}: an option name is in two option groups or in the command itself")

        @wraps(command)
        def wrapper(**kwargs):
            made = tuple(group(**{f.name: kwargs.pop(f.name) for f in group_fields})
                         for group, group_fields in offered.items())
            return command(**kwargs, **{own[slot].name: OptionGroups(made)})

        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def _parameter(group: type, group_field: Field) -> inspect.Parameter:
    annotation = typing.get_type_hints(group, include_extras=True)[group_field.name]
    return inspect.Parameter(group_field.name, inspect.Parameter.KEYWORD_ONLY, default=group_field.default,
                             annotation=annotation)
