"""Click options generated from a pydantic-settings class, for the command lines of the trainer, the
service and `make up`.

Each program keeps one settings class; every field becomes a `--flag` whose help text is the field's
description, default and environment variable. Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    return f"{settings_cls.model_config.get('env_prefix', '')}{field}".upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _click_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return click.Choice([m.value for m in annotation])
    if annotation is Path:
        return click.Path(path_type=Path)
    return {int: click.INT, float: click.FLOAT, bool: bool}.get(annotation, click.STRING)


def settings_options(settings_cls: type[BaseSettings], exclude: tuple[str, ...] = ()):
    """Decorate a click command with one option per settings field (unset flags arrive as None)."""

    def decorate(command):
        for name, field in reversed(list(settings_cls.model_fields.items())):
            if name in exclude:
                continue
            kind = _click_type(field.annotation)
            default = field.default.value if isinstance(field.default, enum.Enum) else field.default
            shown = "none" if default is None else default
            help_text = f"{field.description or ''} [default: {shown}; env: {env_name(settings_cls, name)}]"
            flag = flag_name(name)
            if kind is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
                option = click.option(*decls, name, default=None, help=help_text)
            else:
                option = click.option(flag, name, type=kind, default=None, help=help_text, metavar=_metavar(kind))
            command = option(command)
        return command

    return decorate


def _metavar(kind) -> str | None:
    if isinstance(kind, click.Choice):
        return None
    return {click.INT: "INT", click.FLOAT: "FLOAT"}.get(kind, "TEXT" if kind is click.STRING else "PATH")


def build_settings(settings_cls: type[BaseSettings], flags: dict):
    """Settings from the flags given (None = not given), the environment and the defaults.

    A bad value is reported as a click usage error naming both the flag and the variable.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return settings_cls(**given)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = f"{flag_name(field)} / {env_name(settings_cls, field)}" if field else "settings"
            problems.append(f"{where}: {error['msg']}")
        raise click.UsageError("invalid settings:\n  " + "\n  ".join(problems)) from None
