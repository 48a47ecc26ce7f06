"""The `eztinker` command line: `server`, `rsft`, `rl`, `dpo`, `demo`, `eval`, `export`, `doctor`."""

from __future__ import annotations

import gc
import logging
import os
import sys
import types
import typing
from pathlib import Path

import click
from pydantic import SecretStr, ValidationError
from pydantic_core import ErrorDetails

from .recipes._cli import click_options
from .recipes._settings import TaskRecipeSettings
from .recipes.dpo import Config as DPOConfig
from .recipes.rejection_sft import Config as RecipeConfig
from .recipes.rl import Config as RLConfig
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
        base = (
            args[0]
            if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
            else annotation
        )
        multiple = typing.get_origin(base) is list
        click_type = {int: int, float: float, Path: click.Path(path_type=Path)}.get(base, str)
        default = field.get_default(call_default_factory=True)
        shown = default not in (None, []) and not isinstance(default, SecretStr)
        help_text = (field.description or "") + (f"  [default: {default}]" if shown else "")
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=click_type,
            multiple=multiple,
            default=None,
            help=help_text,
            show_envvar=False,
        )(func)
    return func


def _fail(message: str) -> typing.NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


def build_settings(settings_file: Path | None = None, **flags) -> ServerSettings:
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        if settings_file is not None:
            return ServerSettings.from_file(settings_file, **given)
        return ServerSettings(**given)
    except ValidationError as exc:
        _fail("; ".join(_problem(error) for error in exc.errors()))
    except ValueError as exc:  # an unreadable settings file or keys file
        _fail(str(exc))


def _problem(error: ErrorDetails) -> str:
    """One validation error as a line: the flag it is about (none for a check across settings)
    and the message, without pydantic's "Value error, " prefix."""
    message = error["msg"].removeprefix("Value error, ")
    flag = ".".join(str(part) for part in error["loc"]).replace("_", "-")
    return f"--{flag}: {message}" if flag else message


@app.command()
@_settings_options
@click.option(
    "--settings-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="EZTINKER_SETTINGS_FILE",
    help="JSON or TOML file of these settings (flags override it).",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def server(settings_file: Path | None, log_level: str, **flags) -> None:
    """Run the training server (OpenAPI docs at /docs)."""
    settings = build_settings(settings_file, **flags)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    import uvicorn

    from .launcher import build_service
    from .server.app import create_app
    from .server.connections import draining_server, uvicorn_options
    from .server.datadir import DataDirError

    click.echo(f"loading {', '.join(settings.model)} ...", err=True)
    try:
        service = build_service(settings)
    except DataDirError as exc:  # caught first: the other errors' classes import torch (seconds)
        _fail(str(exc))
    except _start_errors(settings.backend) as exc:
        _fail(str(exc))
    click.echo(f"ready: {', '.join(service.models)}; data in {service.data_dir}", err=True)
    # What is loaded by now (models, tokenizers, libraries) lives as long as the server: keep it
    # out of the collector's full passes, each of which walked its ~400k objects (0.25 s, every
    # thread stopped) on SmolLM2.
    gc.freeze()
    config = uvicorn.Config(
        create_app(service), host=settings.host, port=settings.port, log_level=log_level, **uvicorn_options(settings)
    )
    draining_server(config, service.runner).run()


def _start_errors(backend: str) -> tuple[type[Exception], ...]:
    """A backend's one-line start-up errors (each imported only for its backend: Ray's without torch)."""
    if backend == "ray":
        from .backend.ray import RayStartError

        return (RayStartError,)
    from .engine import ModelLoadError

    return (ModelLoadError,)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_recipe(config: TaskRecipeSettings, main: typing.Callable[[typing.Any], dict] | None = None) -> dict:
    """Run a recipe's `main` (default: rejection SFT's), its expected failures as one line."""
    from .client._errors import ConnectionFailedError, EZTinkerError
    from .evaluation import EvalError
    from .recipes import rejection_sft
    from .tasks.gsm8k import DatasetUnavailableError

    recipe: typing.Callable[[typing.Any], dict] = main or rejection_sft.main  # each recipe takes its own Config
    try:
        return recipe(config)
    except ConnectionFailedError:
        _fail(f"no EZTinker server at {config.server_url}. Start one with: eztinker server --model smollm2-135m")
    except (DatasetUnavailableError, EZTinkerError, EvalError, ValueError) as exc:
        _fail(str(exc))


@app.command()
@click_options(RecipeConfig)
def rsft(**options) -> None:
    """Rejection-sampling SFT against a running server (GSM8K by default)."""
    _quiet_libraries()
    _run_recipe(RecipeConfig(**options))


# ------------------------------------------------------------------------------------ rl
@app.command()
@click_options(RLConfig)
def rl(**options) -> None:
    """RL against a running server: groups of replies per problem, group-normalised advantages."""
    from .recipes.rl import main

    _quiet_libraries()
    _run_recipe(RLConfig(**options), main)


# ----------------------------------------------------------------------------------- dpo
@app.command()
@click_options(DPOConfig)
def dpo(**options) -> None:
    """DPO against a running server: pairs from --pairs-file, or from the run's own samples."""
    from .recipes.dpo import main

    _quiet_libraries()
    _run_recipe(DPOConfig(**options), main)


# The demo's schedule for the embedded model on arithmetic word problems (see README for the
# measurements behind it): a high learning rate that decays keeps the gain without collapse.
DEMO_PRESETS = {
    "arithmetic": dict(
        max_samples=64,
        num_candidates=4,
        epochs=4,
        learning_rate=1e-3,
        lr_decay=0.7,
        temperature=0.8,
        max_tokens=64,
        eval_size=200,
        batch_size=8,
        checkpoint=True,
    ),
    "gsm8k": dict(
        max_samples=16,
        num_candidates=4,
        epochs=2,
        learning_rate=2e-4,
        lr_decay=1.0,
        temperature=0.8,
        max_tokens=256,
        eval_size=20,
        batch_size=8,
        checkpoint=True,
    ),
}


@app.command()
@click.option("--task", type=click.Choice(["arithmetic", "gsm8k"]), default="arithmetic", show_default=True)
@click.option("--model", default="smollm2-135m", show_default=True, help="Base model for the server.")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True)
@click.option("--gsm8k-dir", type=click.Path(path_type=Path), default=None, envvar="EZTINKER_GSM8K_DIR")
@click.option("--epochs", type=int, default=None, help="Override the preset.")
@click.option("--max-samples", type=int, default=None, help="Override the preset.")
@click.option("--num-candidates", type=int, default=None, help="Override the preset.")
@click.option("--eval-size", type=int, default=None, help="Override the preset.")
@click.option("--seed", type=int, default=RecipeConfig.seed, show_default=True)
def demo(task: str, model: str, output_dir: Path, gsm8k_dir: Path | None, seed: int, **overrides) -> None:
    """Start a server on the embedded model and run rejection-sampling SFT on it, end to end."""
    from .launcher import ServerProcess

    _quiet_libraries()
    options = {**DEMO_PRESETS[task], **{k: v for k, v in overrides.items() if v is not None}}
    if task == "gsm8k" and gsm8k_dir is None:
        from .tasks.gsm8k import find_shared_gsm8k_dir

        gsm8k_dir = find_shared_gsm8k_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"starting `eztinker server --model {model}` (the first start converts the model once, ~30 s) ...")
    try:
        server = ServerProcess(model=model, data_dir=output_dir / "server", log_file=output_dir / "server.log")
    except RuntimeError as exc:
        raise click.ClickException(f"the server did not start: {exc}") from exc
    with server:
        # Only the preset and the demo's own flags; everything else is the recipe's default.
        config = RecipeConfig(
            task=task, server_url=server.url, gsm8k_dir=gsm8k_dir, seed=seed, output_dir=output_dir, **options
        )
        _run_recipe(config)
    click.echo(
        f"results: {output_dir / 'rejection_sft_results.json'}, plot: {output_dir / 'rejection_sft_accuracy.png'}"
    )
    click.echo(
        f"to look at the run in the dashboard: eztinker server --model {model} --data-dir {output_dir / 'server'},"
        " then open http://127.0.0.1:8000/"
    )


# ---------------------------------------------------------------------------------- eval
@app.command(name="eval")
@click.argument("model", metavar="MODEL")
@click.option("--tasks", required=True, help="lm-eval tasks, comma-separated (e.g. gsm8k,arc_easy).")
@click.option("--limit", type=float, default=None, help="Examples per task (a fraction of each task below 1).")
@click.option(
    "--include-path",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of lm-eval task YAMLs (local datasets: offline).",
)
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: each task's own).")
@click.option(
    "--max-gen-toks",
    type=int,
    default=None,
    help="New tokens per generation [default: 256, or the server's max_new_tokens if less].",
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Requests per call to the server.")
@click.option("--server-url", default="http://127.0.0.1:8000", show_default=True, envvar="EZTINKER_SERVER_URL")
@click.option("--api-key", default=None, envvar="EZTINKER_API_KEY", help="API key, if the server needs one.")
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("data/eval"),
    show_default=True,
    help="Where lm-eval's results JSON goes.",
)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Record the scores on the server (a run or checkpoint: its dashboard page lists them).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def eval_command(
    model: str,
    tasks: str,
    limit: float | None,
    include_path: Path | None,
    num_fewshot: int | None,
    max_gen_toks: int | None,
    batch_size: int,
    server_url: str,
    api_key: str | None,
    output_dir: Path,
    record: bool,
    seed: int,
) -> None:
    """Evaluate MODEL (a base model, a run, or RUN_ID/CHECKPOINT) with lm-evaluation-harness,
    against the running server's OpenAI API; prints lm-eval's table and writes its JSON."""
    from .evaluation import EvalError, evaluate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcome = evaluate(
            server_url,
            model,
            tasks.split(","),
            limit=limit,
            include_path=include_path,
            api_key=api_key,
            num_fewshot=num_fewshot,
            max_gen_toks=max_gen_toks,
            batch_size=batch_size,
            output_dir=output_dir,
            record=record,
            seed=seed,
        )
    except EvalError as exc:
        _fail(str(exc))
    click.echo(outcome.table)
    click.echo(f"{model}: {', '.join(outcome.scores)} in {outcome.seconds:.0f} s; results: {outcome.json_path}")
    if outcome.recorded is not None:
        click.echo(f"recorded on the server as {outcome.recorded.id} (the run's page in the dashboard lists it)")


@app.command()
@click.argument("checkpoint", metavar="RUN_ID/CHECKPOINT")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--merge", is_flag=True, help="Merge the adapter into the base model: a plain Hugging Face model folder.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("data"),
    show_default=True,
    help="The server's data directory (read only; the server may be running).",
)
@click.option(
    "--model",
    default=None,
    help="Base model (its tokenizer; with --merge its weights too) "
    "instead of the one the checkpoint names, e.g. a local folder of it.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The server's --checkpoint-dir, if it had one (default: <data-dir>/checkpoints).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def export(
    checkpoint: str, out: Path, merge: bool, data_dir: Path, model: str | None, checkpoint_dir: Path | None, force: bool
) -> None:
    """Export a checkpoint: its PEFT adapter folder, or (--merge) the merged model, to OUT."""
    _quiet_libraries()
    from .export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(
            data_dir, checkpoint, out, merge=merge, model=model, force=force, checkpoints=checkpoint_dir
        )
    except ExportError as exc:
        _fail(str(exc))
    what = f"{result.ref} merged into {result.base_model}" if result.merged else f"adapter {result.ref}"
    click.echo(f"exported {what} to {result.out}")


@app.command()
@click.option("--server-url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--gsm8k-dir", type=click.Path(path_type=Path), default=None, envvar="EZTINKER_GSM8K_DIR")
def doctor(server_url: str, gsm8k_dir: Path | None) -> None:
    """Self-check: imports, GSM8K, Math-Verify, the embedded model's files, a tokenizer, the server."""
    _quiet_libraries()
    checks: list[tuple[str, typing.Callable[[], str]]] = [
        ("imports", _check_imports),
        ("GSM8K loads", lambda: _check_gsm8k(gsm8k_dir)),
        ("Math-Verify works", _check_verifier),
        ("embedded model files", _check_embedded_model),
        ("server reachable", lambda: _check_server(server_url)),
    ]
    failed = 0
    for label, check in checks:
        try:
            click.echo(f"  ok    {label}: {check()}")
        except Exception as exc:  # report every check, whatever breaks
            failed += 1
            click.secho(f"  FAIL  {label}: {exc}", fg="red")
    sys.exit(1 if failed else 0)


def _check_imports() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def _check_gsm8k(gsm8k_dir: Path | None) -> str:
    from .tasks import gsm8k

    problems = gsm8k.load_problems("test", limit=3, data_dir=gsm8k_dir or gsm8k.find_shared_gsm8k_dir())
    return f"{len(problems)} test problems read, first gold answer {problems[0].gold}"


def _check_verifier() -> str:
    from .verify import evaluate_answer

    good = evaluate_answer("so the answer is \\boxed{72}", "72")
    bad = evaluate_answer("The answer is 71.", "72")
    if not good["is_correct"] or bad["is_correct"]:
        raise RuntimeError(f"unexpected verdicts {good} / {bad}")
    return f"accepts \\boxed{{72}} ({good['strategy']}), rejects 71"


def _check_embedded_model() -> str:
    from .engine.models import embedded_model_gguf

    path = embedded_model_gguf()
    return f"{path.name}, {path.stat().st_size / 1e6:.0f} MB"


def _check_server(url: str) -> str:
    from .client._client import ServiceClient

    with ServiceClient(url, max_retries=0) as client:
        health = client.health()
        tokenizer = client.get_tokenizer()
    return f"{url}: model {health.model}, {health.runs} runs; tokenizer loads ({len(tokenizer)} tokens)"


if __name__ == "__main__":
    app()
