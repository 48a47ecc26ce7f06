"""A recipe's `Config` dataclass is its CLI: one click option per field, so a default, a help
text or a set of choices is written once, on the field.

    task: str = setting("gsm8k", "Problem set.", choices=TASK_NAMES)
    reward_fn: RewardFn | None = field(default=None, metadata={"cli": False})  # Python only

`--field-name` for every field not marked `cli: False`; bool fields become `--x/--no-x`, Path
fields click.Path, `X | None` fields take X (None when not given).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_CLICK_TYPES: dict[type, Any] = {str: str, int: int, float: float, Path: click.Path(path_type=Path)}


def setting(default: Any, help: str = "", *, choices: Sequence[str] | None = None, envvar: str | None = None) -> Any:
    """A config field with what its flag needs: help text, allowed values, an environment variable."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "envvar": envvar})


def cli_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True)]


def click_options(config_cls: type) -> Callable[[F], F]:
    """Decorator adding one option per CLI field of `config_cls`; the command gets them as keyword
    arguments named like the fields, so `config_cls(**options)` builds the config."""
    hints = typing.get_type_hints(config_cls)

    def decorate(func: F) -> F:
        for f in reversed(cli_fields(config_cls)):
            flag = "--" + f.name.replace("_", "-")
            kind = _without_none(hints[f.name])
            meta = f.metadata
            kwargs: dict[str, Any] = dict(default=f.default, help=meta.get("help", ""), show_default=True)
            if meta.get("envvar"):
                kwargs["envvar"] = meta["envvar"]
            if kind is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            elif meta.get("choices"):
                kwargs["type"] = click.Choice(list(meta["choices"]))
            elif kind in _CLICK_TYPES:
                kwargs["type"] = _CLICK_TYPES[kind]
            else:  # a new field type must be mapped here or kept off the CLI, never passed as a string
                raise TypeError(
                    f"{config_cls.__name__}.{f.name}: no CLI flag for {kind!r}; add metadata={{'cli': False}}"
                )
            func = click.option(flag, f.name, **kwargs)(func)
        return func

    return decorate


def _without_none(hint: Any) -> Any:
    """`X | None` / `Optional[X]` -> X; anything else unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint
