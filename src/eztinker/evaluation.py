"""Evaluate a base model, a run or a checkpoint with lm-evaluation-harness (`eztinker eval`).

lm-eval runs here, as a library, against a running server's OpenAI API: its `local-completions`
model with only the server's URL and the model's name. The server scores prompts for lm-eval's
loglikelihood (multiple-choice) requests through `echo`, generates for its `generate_until`
requests, and serves the tokenizer (`/tokenize`), so nothing of the model is needed on this side.
The results go three places: lm-eval's table (returned for printing), its JSON (written under
`output_dir`) and, for a run or a checkpoint, the server's record of the run's evaluations (the
dashboard's run page lists them).

lm-eval is an optional dependency: `pip install 'eztinker[eval]'`.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .types import EvaluationInfo, EvaluationReport

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default, lowered to the server's max_new_tokens when that is less


class EvalError(Exception):
    """An evaluation that cannot run as asked; its message is one line for the CLI."""


@dataclass(frozen=True)
class EvalTarget:
    """What is evaluated: `model` is its name in the OpenAI API."""

    model: str
    base_model: str
    run_id: str | None = None
    checkpoint: str | None = None


@dataclass
class EvalOutcome:
    target: EvalTarget
    results: dict[str, Any]  # lm-eval's, whole
    scores: dict[str, dict[str, float | None]]  # per task: its metrics
    table: str
    json_path: Path | None = None
    recorded: EvaluationInfo | None = None
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def harness_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm_eval')}"


def evaluate(
    server_url: str,
    model: str,
    tasks: Sequence[str],
    *,
    limit: float | None = None,
    include_path: Path | None = None,
    api_key: str | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    batch_size: int = 8,
    output_dir: Path | None = None,
    record: bool = True,
    seed: int = 0,
    log_samples: bool = False,
) -> EvalOutcome:
    """Run lm-eval's `tasks` on `model` (a base model, a run id, `<run>/<checkpoint>` or a
    `tinker://` path) of the server at `server_url`. `limit`: examples per task (a fraction
    below 1). `include_path`: a folder of task YAMLs (local datasets, offline)."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise EvalError("--tasks: give at least one lm-eval task, e.g. --tasks gsm8k,arc_easy")
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path}: not a folder of lm-eval task YAML files")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit {limit}: must be positive (a count, or a fraction below 1)")
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of the task
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=server_url.rstrip("/"), headers=headers, timeout=60) as http:
        target = resolve_target(http, model)
        limits = _get(http, "/v1/info")
        # lm-eval's remote tokenizer asks /tokenize without a model: the server's default one.
        # Another base model's tokenizer comes as its files, into a folder lm-eval loads.
        tokenizer_files = (
            None
            if target.base_model == limits["model"]
            else _get(http, f"/v1/tokenizer?model={quote(target.base_model)}")["files"]
        )
    lm_eval = _import_lm_eval()
    base = next(m for m in limits["models"] if m["name"] == target.base_model)
    max_length = min(base["max_context_length"], limits["limits"]["max_prompt_tokens"])
    gen = min(max_gen_toks or DEFAULT_MAX_GEN_TOKS, limits["limits"]["max_new_tokens"])

    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = " (local task files: --include-path DIR)" if include_path is None else f" (nor in {include_path})"
        raise EvalError(
            f"--tasks: lm-eval has no task {', '.join(map(repr, unknown))}{hint}; `lm-eval ls tasks` lists them"
        )
    model_args = {
        "base_url": f"{server_url.rstrip('/')}/v1/completions",
        "model": target.model,
        "tokenizer_backend": "remote",
        "tokenized_requests": True,
        "max_length": max_length,
        "max_gen_toks": gen,
        "num_concurrent": 1,
        "max_retries": 1,
        "timeout": 600,
        "seed": seed,
    }
    scratch = tempfile.TemporaryDirectory(prefix="eztinker-tokenizer-")
    if tokenizer_files is not None:
        for name, text in tokenizer_files.items():
            (Path(scratch.name) / name).write_text(text)
        model_args.update(tokenizer_backend="huggingface", tokenizer=scratch.name)
    if api_key:
        model_args["auth_token"] = api_key  # the remote tokenizer's requests; the completions' read OPENAI_API_KEY
    config = {
        "limit": limit,
        "num_fewshot": num_fewshot,
        "max_length": max_length,
        "max_gen_toks": gen,
        "batch_size": batch_size,
        "seed": seed,
        "include_path": str(include_path) if include_path else None,
    }
    started = time.monotonic()
    with scratch, _openai_key(api_key):
        try:
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=model_args,
                tasks=tasks,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except EvalError:
            raise
        except Exception as exc:  # a dataset download offline, a refused request: one line, not lm-eval's traceback
            hint = (
                "; offline, give local task files with --include-path (docs/eval.md)"
                if isinstance(exc, ConnectionError) or "Hub" in str(exc)
                else ""
            )
            raise EvalError(f"lm-eval failed: {type(exc).__name__}: {_first_line(exc)}{hint}") from exc
    if results is None:
        raise EvalError("lm-eval returned no results")
    outcome = EvalOutcome(
        target=target,
        results=results,
        scores=scores_of(results),
        table=lm_eval.utils.make_table(results),
        seconds=time.monotonic() - started,
        config=config,
    )
    if "groups" in results:
        outcome.table += "\n" + lm_eval.utils.make_table(results, "groups")
    if output_dir is not None:
        outcome.json_path = write_results(output_dir, target, results)
    if record and target.run_id is not None:
        with httpx.Client(base_url=server_url.rstrip("/"), headers=headers, timeout=60) as http:
            outcome.recorded = record_evaluation(http, target, outcome.scores, config)
    return outcome


def resolve_target(http: httpx.Client, model: str) -> EvalTarget:
    """The server's model of that name (a 404 or a refused connection: EvalError)."""
    entry = _get(
        http,
        f"/v1/models/{quote(model, safe='/:')}",
        missing=f"the server has no model {model!r} "
        "(GET /v1/models lists its base models, your runs and their checkpoints)",
    )
    if entry.get("parent") is None:
        return EvalTarget(model, entry["root"])
    matched = re.fullmatch(r"tinker://([^/]+)/(?:sampler_)?weights/(.+)", model)
    if matched:
        return EvalTarget(model, entry["root"], matched.group(1), matched.group(2))
    run_id, _, checkpoint = model.partition("/")
    return EvalTarget(model, entry["root"], run_id, checkpoint or None)


def scores_of(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per task, its numeric metrics as lm-eval names them ('acc,none', 'exact_match,strict-match')."""
    scores: dict[str, dict[str, float | None]] = {}
    for task, metrics in results.get("results", {}).items():
        numbers = {}
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "samples":
                numbers[name] = float(value) if math.isfinite(value) else None
        scores[task] = numbers
    return scores


def write_results(output_dir: Path, target: EvalTarget, results: dict[str, Any]) -> Path:
    """lm-eval's results as JSON: `<output_dir>/lm_eval_<model>_<time>[_<n>].json`, never overwriting
    an earlier file (two evaluations can finish within the same second)."""
    from lm_eval.utils import handle_non_serializable

    output_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", target.model).strip("_")
    stem = f"lm_eval_{name}_{time.strftime('%Y%m%dT%H%M%S')}"
    text = json.dumps(results, indent=2, default=handle_non_serializable)
    for n in itertools.count(1):
        path = output_dir / (f"{stem}.json" if n == 1 else f"{stem}_{n}.json")
        try:
            with path.open("x") as file:  # exclusive create: a concurrent writer gets the next name
                file.write(text)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def record_evaluation(http: httpx.Client, target: EvalTarget, scores: dict, config: dict) -> EvaluationInfo:
    report = EvaluationReport(
        checkpoint=target.checkpoint, harness=harness_version(), tasks=list(scores), scores=scores, config=config
    )
    response = http.post(
        f"/v1/runs/{target.run_id}/evaluations",
        content=report.model_dump_json(),
        headers={"Content-Type": "application/json"},
    )
    if response.status_code != 200:
        raise EvalError(f"the server did not record the evaluation: HTTP {response.status_code} {response.text[:300]}")
    return EvaluationInfo.model_validate(response.json())


def _get(http: httpx.Client, path: str, missing: str | None = None) -> dict:
    try:
        response = http.get(path)
    except httpx.TransportError as exc:
        raise EvalError(
            f"no EZTinker server at {http.base_url} ({type(exc).__name__}); start one with "
            "`eztinker server --model ...`"
        ) from None
    if response.status_code == 401:
        raise EvalError("the server refused the API key (--api-key or $EZTINKER_API_KEY)")
    if response.status_code == 404 and missing:
        raise EvalError(missing)
    if response.status_code != 200:
        raise EvalError(f"GET {path}: HTTP {response.status_code} {response.text[:300]}")
    return response.json()


def _task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's task index: the include path's alone when it holds every task asked for (indexing
    lm-eval's own 14,000 task files takes 7 s), else both."""
    if include_path is not None:
        local = _task_index(str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return _task_index(str(include_path) if include_path else None, include_defaults=True)


@functools.cache
def _task_index(include_path: str | None, include_defaults: bool):
    """One index per process and path: a recipe evaluates at every epoch, and lm-eval's own task files
    do not change while it runs (an include path's edits show in the next process)."""
    import lm_eval.tasks

    return lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=include_defaults)


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError:
        raise EvalError("lm-eval is not installed: pip install 'eztinker[eval]' (lm-eval==0.4.13)") from None
    return lm_eval


@contextmanager
def _openai_key(api_key: str | None):
    """lm-eval's completions send $OPENAI_API_KEY as their bearer key: the server's key for the call."""
    previous = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = api_key or previous or "none"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = previous


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
