"""Model work: forward_backward, optim_step, sampling and scoring requests, validated against
the model and the server's limits, and queued as commands for the runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...backend import Progress
from ...backend.commands import ForwardBackward, OptimStep, Sample, Score, ScorePrompts
from ...types import ForwardBackwardRequest, JobRef, OptimStepRequest, SampleRequest, ScoreRequest
from ..records import new_id
from ..runner import Job
from .core import MAX_SEED, ServiceCore
from .errors import invalid

# Ids scored (target_prompt_logprobs) or drawn (prompt_alt_tokens_k) per prompt token, on average: as wide as a top-k.
MAX_PROMPT_CELLS_PER_TOKEN = 64


class WorkPart(ServiceCore):
    def _sampling_model(self, user: str, run_id: str | None, requested: str | None) -> str:
        if run_id is None:
            return self.model(requested)
        _, model = self._usable_run(user, run_id)
        if requested is not None and requested != model:
            raise invalid(("base_model",), f"run {run_id} is on {model!r}, not {requested!r}")
        return model

    def submit_forward_backward(
        self,
        user: str,
        run_id: str,
        request: ForwardBackwardRequest,
        key: str | None,
        *,
        forward_only: bool = False,
        all_logprobs: bool = False,
    ) -> JobRef:
        _, model = self._usable_run(user, run_id)
        limits = self.settings
        if len(request.data) > limits.max_batch_examples:
            raise invalid(
                ("data",),
                f"{len(request.data)} examples; the limit is max_batch_examples ({limits.max_batch_examples})",
            )
        self._check_total_tokens(
            ("data",), sum(len(d.model_input.tokens) for d in request.data), f"{len(request.data)} examples"
        )
        for i, datum in enumerate(request.data):
            self.check_tokens(model, datum.model_input.tokens, ("data", i, "model_input", "tokens"))
            self.check_tokens(
                model, datum.loss_fn_inputs.flat_target_tokens(), ("data", i, "loss_fn_inputs", "target_tokens")
            )
        # Already validated: constructed without a second pass over every datum.
        command = ForwardBackward.model_construct(
            model=model,
            run_id=run_id,
            data=request.data,
            loss_fn=request.loss_fn,
            loss_fn_config=request.loss_fn_config or {},
            forward_only=forward_only,
            all_logprobs=all_logprobs,
        )
        kind_request = (request, forward_only)  # a forward and a forward_backward of one datum differ
        return self.submit(user, Job(new_id("job"), command), kind_request, key)

    def submit_optim_step(self, user: str, run_id: str, request: OptimStepRequest, key: str | None) -> JobRef:
        _, model = self._usable_run(user, run_id)
        command = OptimStep(model=model, run_id=run_id, adam_params=request.adam_params)
        return self.submit(user, Job(new_id("job"), command), request, key)

    def submit_sample(self, user: str, run_id: str | None, request: SampleRequest, key: str | None) -> JobRef:
        model = self._sampling_model(user, run_id, request.base_model)
        _check_unicode(request)
        prompts = [self.encode_prompt(model, p, ("prompts", i)) for i, p in enumerate(request.prompts)]
        return self.submit_sample_tokens(
            user, model, run_id, prompts, request.num_samples, request.sampling_params, request, key
        )

    def submit_sample_tokens(
        self,
        user: str,
        model: str,
        run_id: str | None,
        prompts: list[list[int]],
        num_samples: int,
        params,
        request: Any,
        key: str | None,
        *,
        snapshot: Path | None = None,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
        prompt_targets: list | None = None,
        prompt_alt_tokens_k: int = 0,
        progress: Progress | None = None,
        consumers_gone: Callable[[], bool] | None = None,
    ) -> JobRef:
        """Sample token prompts on `model`: from run `run_id`'s live adapter, a saved `snapshot`
        (a checkpoint directory), or the bare model when both are None. `progress` receives the
        tokens as they are decoded (from the worker thread); `consumers_gone`, asked after every
        decode step, stops the sample once it answers True."""
        if params.seed is not None and params.seed > MAX_SEED:
            raise invalid(("sampling_params", "seed"), f"seed {params.seed} is above the largest allowed, {MAX_SEED}")
        if params.max_tokens > self.settings.max_new_tokens:
            raise invalid(
                ("sampling_params", "max_tokens"),
                f"max_tokens {params.max_tokens} is above the limit {self.settings.max_new_tokens}",
            )
        total = len(prompts) * num_samples
        if total > self.settings.max_samples_per_request:
            raise invalid(
                ("num_samples",),
                f"{len(prompts)} prompts x {num_samples} samples = {total} candidates; "
                f"the limit is {self.settings.max_samples_per_request}",
            )
        # Every candidate holds a KV cache as wide as its prompt plus max_tokens.
        self._check_total_tokens(
            ("num_samples",),
            sum(len(p) + params.max_tokens for p in prompts) * num_samples,
            f"{len(prompts)} prompts x {num_samples} samples x (prompt + {params.max_tokens} max_tokens)",
        )
        self.check_tokens(model, params.stop_token_ids, ("sampling_params", "stop_token_ids"))
        for i, tokens in enumerate(prompts):
            self.check_tokens(model, tokens, ("prompts", i, "tokens"))
        self._check_prompt_scoring(model, prompts, prompt_logprobs_last_n, prompt_targets, prompt_alt_tokens_k)
        command = Sample(
            model=model,
            run_id=run_id,
            prompts=prompts,
            num_samples=num_samples,
            sampling_params=params,
            snapshot=None if snapshot is None else str(snapshot),
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_logprobs=topk_logprobs,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
            prompt_targets=prompt_targets,
            prompt_alt_tokens_k=prompt_alt_tokens_k,
        )
        return self.submit(
            user, Job(new_id("job"), command, progress=progress, consumers_gone=consumers_gone), request, key
        )

    def _check_prompt_scoring(
        self, model: str, prompts: list[list[int]], last_n: int | None, targets: list | None, alt_k: int
    ) -> None:
        """What a sample asks at its prompts' positions fits each prompt: `last_n` at most len - 1,
        `targets` one row per position 1 .. len - 1 of ids in the vocabulary, at most MAX_PROMPT_CELLS_PER_TOKEN
        ids (and draws) per prompt token on average (they cost a vocabulary row each, like a top-k)."""
        vocab = self.models[model].vocab_size
        for i, prompt in enumerate(prompts):
            if last_n is not None and not 1 <= last_n <= len(prompt) - 1:
                raise invalid(
                    ("prompt_logprobs_last_n",),
                    f"prompt_logprobs_last_n is {last_n}; it must be between 1 and len(prompt) - 1 = {len(prompt) - 1}",
                )
            cells_limit = MAX_PROMPT_CELLS_PER_TOKEN * len(prompt)
            if alt_k * (len(prompt) - 1) > cells_limit:
                raise invalid(
                    ("prompt_alt_tokens_k",),
                    f"prompt_alt_tokens_k {alt_k} x {len(prompt) - 1} positions "
                    f"is above the limit of {cells_limit} ({MAX_PROMPT_CELLS_PER_TOKEN} per prompt token)",
                )
            if targets is None:
                continue
            rows = targets[i]
            if len(rows) != len(prompt) - 1:
                raise invalid(
                    ("target_prompt_logprobs",),
                    f"target_prompt_logprobs has {len(rows)} rows; the prompt "
                    f"has {len(prompt)} tokens, so it needs len(prompt) - 1 = {len(prompt) - 1}",
                )
            cells = sum(len(row) for row in rows)
            if cells == 0:
                raise invalid(
                    ("target_prompt_logprobs",), "target_prompt_logprobs names no token id (every cell is -1)"
                )
            if cells > cells_limit:
                raise invalid(
                    ("target_prompt_logprobs",),
                    f"target_prompt_logprobs names {cells} ids; the limit is "
                    f"{cells_limit} ({MAX_PROMPT_CELLS_PER_TOKEN} per prompt token)",
                )
            for r, row in enumerate(rows):
                for token in row:
                    if not 0 <= token < vocab:
                        raise invalid(
                            ("target_prompt_logprobs", r), f"token id {token} is outside the vocabulary [0, {vocab})"
                        )

    def submit_score_prompts(
        self,
        user: str,
        model: str,
        run_id: str | None,
        prompts: list[list[int]],
        topk: int,
        request: Any,
        *,
        snapshot: Path | None = None,
    ) -> JobRef:
        """Score token prompts on `model` (a run's live adapter, a saved `snapshot`, or the bare
        model): every token's logprob given those before it, one forward pass, no sampling."""
        if len(prompts) > self.settings.max_batch_examples:
            raise invalid(
                ("prompts",),
                f"{len(prompts)} prompts; the limit is max_batch_examples ({self.settings.max_batch_examples})",
            )
        self._check_total_tokens(("prompts",), sum(len(p) for p in prompts), f"{len(prompts)} prompts")
        for i, tokens in enumerate(prompts):
            self.check_tokens(model, tokens, ("prompts", i, "tokens"))
        command = ScorePrompts(
            model=model, run_id=run_id, prompts=prompts, topk=topk, snapshot=None if snapshot is None else str(snapshot)
        )
        return self.submit(user, Job(new_id("job"), command), request, None)

    def submit_score(self, user: str, run_id: str, request: ScoreRequest, key: str | None) -> JobRef:
        _, model = self._usable_run(user, run_id)
        _check_unicode(request)
        limit = self.settings.max_batch_examples
        if len(request.responses) > limit:
            raise invalid(
                ("responses",), f"{len(request.responses)} responses; the limit is max_batch_examples ({limit})"
            )
        prompt = self.encode_prompt(model, request.prompt, ("prompt",))
        responses = [self.backend.encode_text(model, r) for r in request.responses]
        self._check_total_tokens(
            ("responses",), sum(len(prompt) + len(r) for r in responses), f"{len(responses)} x (prompt + response)"
        )
        for i, tokens in enumerate(responses):
            if len(prompt) + len(tokens) > self.settings.max_prompt_tokens:
                raise invalid(("responses", i), f"prompt + response exceed {self.settings.max_prompt_tokens} tokens")
        command = Score(model=model, run_id=run_id, prompt=prompt, responses=responses)
        return self.submit(user, Job(new_id("job"), command), request, key)


def _check_unicode(request: Any) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer accepts: a prompt,
    message, response or stop string holding one would make the request a 500 (or its job fail
    later). Refuse them up front, naming the field."""

    def walk(value: Any, loc: tuple) -> None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise invalid(loc, f"text is not valid Unicode: lone surrogate at position {exc.start}") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*loc, i))

    walk(request.model_dump(), ())
