"""`/v1/completions` with `echo: true`: the prompt comes back in the text and, with `logprobs`, its
tokens with their logprobs, as OpenAI's legacy API and vLLM answer it. This is how harnesses score
text: lm-eval's loglikelihood requests (multiple choice) send `echo: true, logprobs: 1,
max_tokens: 1` and read the prompt's `token_logprobs`; `max_tokens: 0` scores the prompt alone.

- `max_tokens: 0`: one forward pass over the prompts (a ScorePrompts job, batched with the other
  scorings queued beside it), no sampling. `n` copies of the answer per prompt, as vLLM gives.
- `max_tokens >= 1`: a sample whose prompt logprobs are computed too; each choice is the prompt
  followed by its completion, tokens and logprobs alike.

A prompt token's logprob is log p(token | the tokens before it) at temperature 1 under the model's
adapter (the bare model, a run's live adapter or a checkpoint), the same number the training path's
`forward` gives for that target; the first token has none (None), and its `top_logprobs` entry is
None too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from fastapi.concurrency import run_in_threadpool

from ...backend.results import PromptScores, Samples, parse_result
from ...types import SampledSequence
from ..records import JobRecord
from ..service import Service, ServiceError
from . import protocol as p
from .answers import Target
from .errors import OpenAIError, from_service_error

_NAMES = {"max_tokens": "max_tokens", "prompts": "prompt"}


class _Scored:
    """One prompt as echoed: its text, tokens and (with logprobs) their logprobs and top tokens."""

    def __init__(self, text: str, tokens: list[int], logprobs: list[float | None] | None, top: list | None):
        self.text, self.tokens, self.logprobs, self.top = text, tokens, logprobs, top


async def echo_completion(
    service: Service,
    user: str,
    body: p.CompletionRequest,
    completion_id: str,
    created: int,
    *,
    resolve: Callable[[str, str], Target],
    sampling_params: Callable,
    prompts_of: Callable[[str, p.CompletionRequest], list[list[int]]],
    finished: Callable,
    failure: Callable,
) -> p.Completion:
    if body.stream:
        raise OpenAIError(400, "stream is not supported with echo by this server (ask without stream)", "stream")
    want_logprobs = body.logprobs is not None
    top = body.logprobs or 0

    def submit() -> tuple[Target, list[list[int]], str | None]:
        target = resolve(user, body.model)
        run_id = target.run_id if target.snapshot is None else None
        try:
            prompts = prompts_of(target.base_model, body)
            if body.max_tokens == 0:
                limit = service.settings.max_samples_per_request
                if len(prompts) * body.n > limit:  # the copies are free to compute, not to send
                    raise OpenAIError(
                        400,
                        f"{len(prompts)} prompts x n {body.n} = {len(prompts) * body.n} choices; the limit is {limit}",
                        "n",
                    )
                if not want_logprobs:  # the text alone: nothing to compute
                    return target, prompts, None
                ref = service.submit_score_prompts(
                    user, target.base_model, run_id, prompts, top, body, snapshot=target.snapshot
                )
            else:
                params = sampling_params(body, body.max_tokens, "max_tokens")
                ref = service.submit_sample_tokens(
                    user,
                    target.base_model,
                    run_id,
                    prompts,
                    body.n,
                    params,
                    body,
                    None,
                    snapshot=target.snapshot,
                    prompt_logprobs=want_logprobs,
                    topk_prompt_logprobs=top,
                    topk_logprobs=top,
                )
        except ServiceError as exc:
            raise from_service_error(exc, _NAMES) from None
        return target, prompts, ref.job_id

    target, prompts, job_id = await run_in_threadpool(submit)
    record = None
    if job_id is not None:
        record = await finished(user, job_id)
        if record.error is not None:
            raise failure(record)
    return await run_in_threadpool(_answer, service, body, target, prompts, record, completion_id, created, top)


def _answer(
    service: Service,
    body: p.CompletionRequest,
    target: Target,
    prompts: list[list[int]],
    record: JobRecord | None,
    completion_id: str,
    created: int,
    top: int,
) -> p.Completion:
    """The choices (a worker thread: token bytes are the backend tokenizer's). `record`: the
    finished ScorePrompts or Sample job; None when only the prompts' text is asked for."""
    model = service.models[target.base_model]
    texts = _prompt_texts(service, body, target.base_model, prompts)
    value = None if record is None or record.result_json is None else parse_result(record.kind, record.result_json)
    if not isinstance(value, (Samples, PromptScores, type(None))):
        raise TypeError(f"an echo is answered from a sample or a scoring, not a {type(value).__name__}")
    unscored: list = [None] * len(prompts)
    prompt_logprobs = (value.prompt_logprobs if value is not None else None) or unscored
    prompt_top = (value.topk_prompt_logprobs if value is not None else None) or unscored
    stop_ids = frozenset(model.stop_token_ids)
    choices, completion_tokens = [], 0
    for i, tokens in enumerate(prompts):
        echoed = _Scored(texts[i], tokens, prompt_logprobs[i], prompt_top[i])
        # max_tokens 0: the prompt alone, once per candidate asked for.
        sequences: list[SampledSequence | None] = [None] * body.n
        if isinstance(value, Samples):
            sequences = list(value.sequences[i])
        for k, sequence in enumerate(sequences):
            parts = [echoed]
            finish = "length"
            if sequence is not None:
                completion_tokens += len(sequence.tokens)
                visible = sequence.tokens
                if visible and visible[-1] in stop_ids:
                    visible = visible[:-1]
                parts.append(
                    _Scored(
                        sequence.text,
                        visible,
                        list(sequence.logprobs[: len(visible)]),
                        None if sequence.top_logprobs is None else sequence.top_logprobs[: len(visible)],
                    )
                )
                finish = sequence.stop_reason
            logprobs = _logprobs(service, target.base_model, parts, top) if body.logprobs is not None else None
            choices.append(
                p.CompletionChoice(
                    index=i * len(sequences) + k,
                    text="".join(s.text for s in parts),
                    logprobs=logprobs,
                    finish_reason=finish,
                )
            )
    prompt_tokens = sum(len(t) for t in prompts)
    usage = p.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    return p.Completion(id=completion_id, created=created, model=target.name, choices=choices, usage=usage)


def _prompt_texts(service: Service, body: p.CompletionRequest, model: str, prompts: list[list[int]]) -> list[str]:
    """The prompts' text as the client gave it; a token prompt's is its tokens' bytes (special
    tokens included, so the text and the listed tokens agree)."""
    given = body.prompt
    items: Sequence[str | list[int]]
    if isinstance(given, str) or all(isinstance(x, int) for x in given):
        items = [cast("str | list[int]", given)]  # one prompt
    else:
        items = cast("list[str] | list[list[int]]", given)
    texts = []
    for item, tokens in zip(items, prompts):
        if isinstance(item, str):
            texts.append(item)
        else:
            texts.append(b"".join(service.token_bytes(model, tokens)).decode("utf-8", "replace"))
    return texts


def _logprobs(service: Service, model: str, parts: list[_Scored], top: int) -> p.CompletionLogprobs:
    ids = [t for part in parts for t in part.tokens]
    ids += [pair[0] for part in parts for entry in (part.top or []) if entry for pair in entry[:top]]
    pieces = dict(zip(ids, service.token_bytes(model, ids))) if ids else {}
    text = lambda t: pieces[t].decode("utf-8", "replace")  # noqa: E731
    tokens, token_logprobs, top_logprobs, offsets, at = [], [], [], [], 0
    for part in parts:
        part_top = part.top or [None] * len(part.tokens)
        for position, token in enumerate(part.tokens):
            tokens.append(text(token))
            token_logprobs.append(None if part.logprobs is None else part.logprobs[position])
            entry = part_top[position]
            top_logprobs.append(None if entry is None else {text(t): lp for t, lp in entry[:top]})
            offsets.append(at)
            at += len(text(token))
    return p.CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs if top else None, text_offset=offsets
    )
