"""The in-process backend: one `Engine` per base model, each model's weights loaded once and
shared by all of its runs, all of its torch work on one thread (compute_thread.py says why)."""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from ..atomic_writes import remove_partial_writes
from ..chat import render_prompt
from ..device_placement import PlacementError, place_models
from ..engine import BaseModel, Engine, EngineError, ModelLoadError, SampleSpec, load_base_model
from ..engine.engine import InvalidTarget, PromptLogprobs, read_training_state
from ..engine.prompt_scoring import ExtrasResult, PromptExtras
from ..types import LoraConfig, Prompt, ScoreResult
from . import ABANDONED, Cancelled, CheckpointState, InvalidInput, ModelInfo, Progress, WorkerInfo
from .commands import (
    Command,
    CreateRun,
    DeleteRun,
    ErrorCategory,
    ForwardBackward,
    Load,
    OptimStep,
    Outcome,
    Sample,
    Save,
    Score,
    ScorePrompts,
)
from .compute_thread import ComputeThread
from .results import AltTokens, Loaded, PromptScores, Result, RunCreated, RunDeleted, Samples, Saved

log = logging.getLogger(__name__)


def _extras(scored: PromptLogprobs) -> ExtrasResult:
    assert scored.extras is not None, "prompt_logprobs returns each prompt's extras when given PromptExtras"
    return scored.extras


def _topk(scored: PromptLogprobs) -> list[list[list] | None]:
    assert scored.topk is not None, "prompt_logprobs returns the top k when topk > 0"
    return scored.topk


def _warm(engine: Engine) -> Engine:
    """The engine with its base weights packed and timed now, not in the first request's time."""
    engine.warm_up()
    return engine


class LocalBackend:
    def __init__(self, bases: Sequence[BaseModel], *, compute: ComputeThread | None = None, **engine_options):
        """Engines for models loaded already (`load` loads them on the backend's compute thread)."""
        if not bases:
            raise ValueError("a backend needs at least one base model")
        names = [base.name for base in bases]
        if len(set(names)) != len(names):
            raise ValueError(f"base models must be distinct, got {names}")
        self._compute = compute or ComputeThread()
        self.engines = self._compute.run(lambda: {base.name: _warm(Engine(base, **engine_options)) for base in bases})
        self._tokenizer_files: dict[str, dict[str, str]] = {}

    @classmethod
    def load(
        cls, specs: Sequence[str], *, cache_dir: Path, device: str | Sequence[str] | None, **engine_options
    ) -> LocalBackend:
        """Load each model (ModelLoadError names the one that fails) and build its engine, both on
        the thread that will run its commands. `device`: the `--device` entries (device_placement.py:
        none spreads the models over the visible GPUs)."""
        compute = ComputeThread()
        requests = [device] if isinstance(device, str) else list(device or ())

        def load_all() -> list[BaseModel]:
            import torch

            try:
                placement = place_models(specs, requests, torch.cuda.device_count())
            except PlacementError as exc:
                raise ModelLoadError(f"--device: {exc}") from None
            return [load_base_model(spec, cache_dir=cache_dir, device=placement[spec]) for spec in specs]

        try:
            bases = compute.run(load_all)
            return cls(bases, compute=compute, **engine_options)
        except BaseException:
            compute.close()
            raise

    def engine(self, model: str) -> Engine:
        try:
            return self.engines[model]
        except KeyError:
            raise EngineError(f"unknown base model {model!r}; this backend holds {sorted(self.engines)}") from None

    def models(self) -> list[ModelInfo]:
        return [_model_info(engine.base) for engine in self.engines.values()]

    # ------------------------------------------------------------------------- model work
    def lanes(self, command: Command) -> list[Hashable]:
        return [None]  # one process, one lane: every command in submission order

    def workers(self) -> list[WorkerInfo]:
        return []

    def execute(
        self,
        commands: Sequence[Command],
        progress: Sequence[Progress | None] | None = None,
        lane: Hashable = None,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[Outcome]:
        return self._compute.run(lambda: self._execute(commands, progress, cancelled))

    def _execute(
        self,
        commands: Sequence[Command],
        progress: Sequence[Progress | None] | None,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[Outcome]:
        progress = list(progress) if progress is not None else [None] * len(commands)
        cancelled = list(cancelled) if cancelled is not None else [None] * len(commands)
        fuse: Callable[[], Sequence[Result | Outcome]] | None = None
        samples = [c for c in commands if isinstance(c, Sample)]
        scorings = [c for c in commands if isinstance(c, ScorePrompts)]
        if len(commands) > 1 and len(samples) == len(commands):
            fuse = lambda: self._sample_many(samples, progress, cancelled)  # noqa: E731
        elif len(commands) > 1 and len(scorings) == len(commands):
            fuse = lambda: self._score_prompts_many(scorings)  # noqa: E731
        if fuse is not None:
            try:
                return [value if isinstance(value, Outcome) else Outcome(value=value) for value in fuse()]
            except EngineError:
                pass  # one bad request must not fail its neighbours: each alone
            except Exception:
                log.exception("a fused batch failed; each of its commands runs alone")
        return [
            _attempt(functools.partial(self._execute_one, command, listener, cancel))
            for command, listener, cancel in zip(commands, progress, cancelled)
        ]

    def _execute_one(
        self, command: Command, progress: Progress | None = None, cancelled: Cancelled | None = None
    ) -> Result:
        engine = self.engine(command.model)
        match command:
            case CreateRun():
                engine.create_run(command.run_id, command.lora, command.seed)
                step = 0
                if command.from_checkpoint is not None:
                    try:
                        step = engine.load(
                            command.run_id, Path(command.from_checkpoint), with_optimizer=command.with_optimizer
                        )
                    except BaseException:
                        engine.delete_run(command.run_id)  # a failed create leaves nothing behind
                        raise
                return RunCreated(run_id=command.run_id, step=step)
            case DeleteRun():
                engine.delete_run(command.run_id)
                return RunDeleted(deleted=command.run_id)
            case ForwardBackward():
                return engine.forward_backward(
                    command.run_id,
                    command.data,
                    command.loss_fn,
                    loss_fn_config=command.loss_fn_config,
                    forward_only=command.forward_only,
                    all_logprobs=command.all_logprobs,
                )
            case OptimStep():
                return engine.optim_step(command.run_id, command.adam_params)
            case Sample():
                value = self._sample_many([command], [progress], [cancelled])[0]
                if isinstance(value, Outcome):
                    raise _Failed(value)
                return value
            case ScorePrompts():
                return self._score_prompts_many([command])[0]
            case Score():
                return ScoreResult(scores=engine.score(command.run_id, command.prompt, command.responses))
            case Save():
                engine.save(command.run_id, Path(command.directory), with_optimizer=command.with_optimizer)
                return Saved(step=engine.step_of(command.run_id))
            case Load():
                return Loaded(
                    step=engine.load(command.run_id, Path(command.directory), with_optimizer=command.with_optimizer)
                )
        raise EngineError(f"unknown command {command.kind!r}")

    def _sample_many(
        self,
        commands: Sequence[Sample],
        progress: Sequence[Progress | None],
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[Samples | Outcome]:
        """Each command's samples, or for one abandoned by its consumers, the Outcome saying so."""
        cancelled = cancelled or [None] * len(commands)
        engine = self.engine(commands[0].model)
        adapters: list[str | None] = []
        for c in commands:
            # A snapshot loaded for an earlier command of this batch must stay until it has sampled.
            pinned = [a for a in adapters if a is not None]
            adapters.append(c.run_id if c.snapshot is None else engine.snapshot(Path(c.snapshot), pinned=pinned))
        specs = [
            SampleSpec(
                a, c.prompts, c.num_samples, c.sampling_params, top_logprobs=c.topk_logprobs, on_tokens=p, cancelled=q
            )
            for a, c, p, q in zip(adapters, commands, progress, cancelled)
        ]
        results = engine.sample(specs)
        values: list[Samples | Outcome] = []
        for c, adapter, result, spec in zip(commands, adapters, results, specs):
            if spec.abandoned:
                decoded = sum(len(s.tokens) for row in result for s in row)
                most = c.sampling_params.max_tokens * c.num_samples * len(c.prompts)
                values.append(
                    Outcome.failed(
                        f"{ABANDONED}: every consumer of this sample went away; it stopped "
                        f"decoding after {decoded} of at most {most} tokens",
                        ErrorCategory.user,
                        decoded_tokens=decoded,
                    )
                )
                continue
            # top_logprobs only where asked for (the engine may fill them for a batch neighbour's sake)
            keep = None if c.topk_logprobs else {"top_logprobs": None}
            sequences = [[s.model_copy(update=keep) for s in row] for row in result]
            if c.topk_logprobs:
                assert all(s.top_logprobs is not None for row in result for s in row), "asked for: returned"
            extra: dict[str, list] = {}
            if c.prompt_logprobs or c.topk_prompt_logprobs or c.prompt_targets is not None or c.prompt_alt_tokens_k:
                extras = [
                    PromptExtras(
                        targets=None if c.prompt_targets is None else c.prompt_targets[i],
                        alt_k=c.prompt_alt_tokens_k,
                        temperature=c.sampling_params.temperature,
                        seed=c.sampling_params.seed,
                    )
                    for i in range(len(c.prompts))
                ]
                scored = engine.prompt_logprobs(
                    adapter, c.prompts, c.topk_prompt_logprobs, last_n=c.prompt_logprobs_last_n, extras=extras
                )
                if c.prompt_logprobs:
                    extra["prompt_logprobs"] = [s.logprobs for s in scored]
                if c.topk_prompt_logprobs:
                    extra["topk_prompt_logprobs"] = [_topk(s) for s in scored]
                if c.prompt_targets is not None:
                    extra["target_prompt_logprobs"] = [_extras(s).target_logprobs or [] for s in scored]
                if c.prompt_alt_tokens_k:
                    extra["prompt_alt_tokens"] = [
                        AltTokens(tokens=_extras(s).alt_tokens or [], logprobs=_extras(s).alt_logprobs or [])
                        for s in scored
                    ]
            values.append(Samples(prompt_tokens=c.prompts, sequences=sequences, **extra))
        return values

    def _score_prompts_many(self, commands: Sequence[ScorePrompts]) -> list[PromptScores]:
        """All prompts of the batch, grouped by adapter, in forward passes of at most the engine's
        `microbatch_tokens` padded tokens each (one pass for a few short prompts)."""
        engine = self.engine(commands[0].model)
        adapters: list[str | None] = []
        for c in commands:
            pinned = [a for a in adapters if a is not None]
            adapters.append(c.run_id if c.snapshot is None else engine.snapshot(Path(c.snapshot), pinned=pinned))
        rows: dict[str | None, list[tuple[int, int]]] = {}  # adapter -> (command, prompt) in the batch
        for i, (c, adapter) in enumerate(zip(commands, adapters)):
            rows.setdefault(adapter, []).extend((i, j) for j in range(len(c.prompts)))
        scored: dict[tuple[int, int], PromptLogprobs] = {}
        for adapter, keys in rows.items():
            keys.sort(key=lambda k: -len(commands[k[0]].prompts[k[1]]))  # longest first: less padding
            topk = max(commands[i].topk for i, _ in keys)
            chunk: list[tuple[int, int]] = []
            for n, key in enumerate(keys):
                chunk.append(key)
                width = len(commands[chunk[0][0]].prompts[chunk[0][1]])
                next_fits = n + 1 < len(keys) and (len(chunk) + 1) * width <= engine.microbatch_tokens
                if not next_fits:
                    results = engine.prompt_logprobs(adapter, [commands[i].prompts[j] for i, j in chunk], topk)
                    scored.update(zip(chunk, results))
                    chunk = []
        values = []
        for i, c in enumerate(commands):
            mine = [scored[(i, j)] for j in range(len(c.prompts))]
            top = [[None if t is None else t[: c.topk] for t in _topk(s)] for s in mine] if c.topk else None
            values.append(PromptScores(prompt_logprobs=[s.logprobs for s in mine], topk_prompt_logprobs=top))
        return values

    # ---------------------------------------------------------------------- tokenizer work
    def encode_prompt(self, model: str, prompt: Prompt) -> list[int]:
        tokenizer = self.engine(model).base.tokenizer
        if prompt.tokens is not None:
            return prompt.tokens
        if prompt.messages is not None:
            return render_prompt(tokenizer, prompt.messages)
        tokens = tokenizer.encode(prompt.text, add_special_tokens=False)
        if not tokens:
            raise InvalidInput(("text",), "text encodes to no tokens")
        return tokens

    def encode_text(self, model: str, text: str) -> list[int]:
        return self.engine(model).base.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, model: str, tokens: list[int]) -> str:
        # A list of ids decodes to one str; transformers types decode's result as str | list[str].
        return self.engine(model).base.tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[return-value]

    def token_bytes(self, model: str, tokens: list[int]) -> list[bytes]:
        tokenizer = self.engine(model).base.tokenizer
        if _byte_level(tokenizer):  # GPT-2-style pieces spell each byte as one character
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            if all(p is not None and all(ch in _BYTE_OF_CHAR for ch in p) for p in pieces):
                return [bytes(_BYTE_OF_CHAR[ch] for ch in p) for p in pieces]
        return [tokenizer.decode([t]).encode() for t in tokens]  # type: ignore[union-attr]  # str for a list of ids

    def tokenizer_files(self, model: str) -> dict[str, str]:
        # A base model's tokenizer never changes while the server runs, and writing it out costs
        # ~0.3 s (Qwen2's tokenizer.json is 11 MB): written once per model, then served from memory.
        files = self._tokenizer_files.get(model)
        if files is None:
            with tempfile.TemporaryDirectory() as tmp:
                self.engine(model).base.tokenizer.save_pretrained(tmp)
                files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
            self._tokenizer_files[model] = files
        return dict(files)

    # ------------------------------------------------------------------- checkpoint format
    def check_lora(self, model: str, lora: LoraConfig) -> None:
        try:
            self.engine(model).check_target_modules(lora.target_modules)
        except InvalidTarget as exc:
            raise InvalidInput(
                ("target_modules",) if exc.index is None else ("target_modules", exc.index), str(exc)
            ) from None

    def read_checkpoint(self, directory: Path) -> CheckpointState:
        try:
            state = read_training_state(directory)
            return CheckpointState(
                step=int(state["step"]),
                lora=LoraConfig.model_validate(state["lora"]),
                base_model=state.get("base_model"),
                has_optimizer=bool(state.get("optimizer", True)),
            )
        except EngineError as exc:
            raise InvalidInput((), str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput((), f"unreadable checkpoint: {exc}") from None

    def remove_partial_writes(self, root: Path) -> list[Path]:
        return remove_partial_writes(root)

    def close(self) -> None:
        self._compute.close()


class _Failed(Exception):
    """Ends a command with an outcome of its own (an abandoned sample's)."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.error)
        self.outcome = outcome


def _attempt(work: Callable[[], Result]) -> Outcome:
    try:
        return Outcome(value=work())
    except _Failed as failed:
        return failed.outcome
    except EngineError as exc:
        return Outcome.failed(str(exc), ErrorCategory.user)
    except Exception as exc:  # a failing command fails alone; the server keeps serving
        log.exception("command failed")
        return Outcome.failed(f"{type(exc).__name__}: {exc}")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is spelt with, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _bytes_to_unicode()
_BYTE_LEVEL: dict[int, bool] = {}


def _byte_level(tokenizer) -> bool:
    key = id(tokenizer)
    if key not in _BYTE_LEVEL:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))
        _BYTE_LEVEL[key] = any(p and p.startswith("Ġ") for p in pieces)
    return _BYTE_LEVEL[key]


def _model_info(base: BaseModel) -> ModelInfo:
    config = base.model.config
    architectures = getattr(config, "architectures", None) or [type(base.model).__name__]
    return ModelInfo(
        name=base.name,
        architecture=architectures[0],
        vocab_size=base.vocab_size,
        max_context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        stop_token_ids=tuple(sorted(base.stop_token_ids)),
        tokenizer_id=base.source,
    )
