"""What a request can ask for at a prompt's positions beyond each token's own logprob: the logprobs
of chosen token ids (Tinker's `target_prompt_logprobs`) and independent draws from the model's
next-token distribution (`prompt_alt_tokens_k`).

Both read the whole log-softmax row of a position, so they work on rows `[C, V]` handed in
chunk by chunk (the caller bounds C); nothing here knows about models or adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptExtras:
    """Per prompt, asked at positions 1 .. len(prompt) - 1 (row i: the distribution over token i + 1)."""

    targets: list[list[int]] | None = None  # row i: token ids whose logprobs to return (may be empty)
    alt_k: int = 0  # draws per row
    temperature: float = 1.0  # of the draws; 0: the most likely token, k times
    seed: int | None = None


@dataclass
class ExtrasResult:
    target_logprobs: list[list[float]] | None = None  # row i: one per targets[i]
    alt_tokens: list[list[int]] | None = None  # [len(prompt) - 1][alt_k]
    alt_logprobs: list[list[float]] | None = None  # the model's logprob (temperature 1) of each draw


# Elements of one [C, V] float32 chunk: a few such tensors are alive at once (log-softmax, the draws'
# tempered probabilities), e.g. 220 rows of a 152k vocabulary, 128 MB each.
_CHUNK_ELEMENTS = 1 << 25


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def generator_for(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def score_rows(
    logprobs_C_V: torch.Tensor,
    extras: PromptExtras,
    first_row: int,
    generator: torch.Generator | None,
    result: ExtrasResult,
) -> None:
    """Append to `result` what `extras` asks of rows first_row .. first_row + C - 1 (their
    temperature-1 log-softmax `logprobs_C_V`)."""
    n = logprobs_C_V.shape[0]
    if extras.targets is not None:
        assert result.target_logprobs is not None  # score_prompt makes the lists extras asks for
        for i in range(n):
            ids = extras.targets[first_row + i]
            if ids:
                index = torch.tensor(ids, dtype=torch.long, device=logprobs_C_V.device)
                result.target_logprobs.append(logprobs_C_V[i].gather(0, index).tolist())
            else:
                result.target_logprobs.append([])
    if extras.alt_k:
        assert result.alt_tokens is not None and result.alt_logprobs is not None
        if extras.temperature == 0:
            drawn = logprobs_C_V.argmax(dim=-1, keepdim=True).expand(n, extras.alt_k)
        else:
            probs = torch.softmax(logprobs_C_V / extras.temperature, dim=-1)
            drawn = torch.multinomial(probs, extras.alt_k, replacement=True, generator=generator)
        result.alt_tokens.extend(drawn.tolist())
        result.alt_logprobs.extend(logprobs_C_V.gather(-1, drawn).tolist())


def score_prompt(hidden_T_H: torch.Tensor, extras: PromptExtras, log_softmax, chunk: int) -> ExtrasResult:
    """`hidden_T_H`: the prompt's final hidden states at positions 0 .. len - 2 (each predicts the
    next token); `log_softmax(hidden_C_H) -> [C, V]` the model's temperature-1 logprobs."""
    result = ExtrasResult(
        target_logprobs=[] if extras.targets is not None else None,
        alt_tokens=[] if extras.alt_k else None,
        alt_logprobs=[] if extras.alt_k else None,
    )
    generator = generator_for(extras.seed, hidden_T_H.device) if extras.alt_k else None
    for start in range(0, hidden_T_H.shape[0], chunk):
        score_rows(log_softmax(hidden_T_H[start : start + chunk]), extras, start, generator, result)
    return result
