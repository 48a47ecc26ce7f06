"""The `eztinker` command line: `server`, `rsft`, `demo`, `doctor`."""

from __future__ import annotations

import logging
import os
import sys
import types
import typing
from pathlib import Path

import click
from pydantic import SecretStr, ValidationError

from .server.settings import ServerSettings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="eztinker")
def app() -> None:
    """EZTinker: a self-hosted LoRA fine-tuning service for small language models."""


def _settings_options(func):
    """One CLI flag per ServerSettings field, with the field's description as help."""
    for name, field in reversed(list(ServerSettings.model_fields.items())):
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else annotation
        multiple = typing.get_origin(base) is list
        click_type = {int: int, float: float, Path: click.Path(path_type=Path)}.get(base, str)
        default = field.default if field.default is not None and not isinstance(field.default, (SecretStr, list)) else None
        help_text = (field.description or "") + (f"  [default: {default}]" if default is not None else "")
        func = click.option(
            f"--{name.replace('_', '-')}", name, type=click_type, multiple=multiple, default=None, help=help_text,
            show_envvar=False,
        )(func)
    return func


def _fail(message: str) -> typing.NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


def build_settings(**flags) -> ServerSettings:
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        _fail(problems)


@app.command()
@_settings_options
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def server(log_level: str, **flags) -> None:
    """Run the training server (OpenAPI docs at /docs)."""
    settings = build_settings(**flags)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    import uvicorn

    from .engine import ModelLoadError, load_base_model
    from .server.app import create_app
    from .server.service import Service

    click.echo(f"loading model {settings.model} ...", err=True)
    try:
        base = load_base_model(settings.model, cache_dir=Path(settings.data_dir) / "cache", device=settings.device)
    except ModelLoadError as exc:
        _fail(str(exc))
    service = Service(settings, base)
    click.echo(f"model {base.name} ready; data in {Path(settings.data_dir).resolve()}", err=True)
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=log_level)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    app()
