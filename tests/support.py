"""Small helpers shared by the tests that drive a server through the SDK."""

from __future__ import annotations

from eztinker import AdamParams, Datum, LossFnInputs, ModelInput, datum_from_tokens

# The tiny Qwen2 the tests serve (conftest.tiny_model_dir): Qwen2's first 16,384 BPE tokens, then its
# 3 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>), in a vocabulary padded by 64 spare rows.
TINY_BPE_TOKENS = 16_384
TINY_IM_END = TINY_BPE_TOKENS + 2
TINY_VOCAB = TINY_BPE_TOKENS + 3 + 64

FAST = AdamParams(learning_rate=1e-2)
PROMPT = [100, 200, 300]
REPLY = [400, 500, 600, 700]
EXAMPLE = datum_from_tokens(PROMPT, REPLY)


def slow_batch(positions: int, examples: int = 1) -> list[Datum]:
    """`examples` examples whose every position carries loss: the longest-running forward_backward
    per token there is (the output projection over the whole vocabulary at every position). On the
    tiny model, one core, about 0.4 ms a position."""
    tokens = [(i * 7919) % (TINY_BPE_TOKENS - 10) + 10 for i in range(positions + 1)]
    datum = Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * positions),
    )
    return [datum] * examples


def train(run, steps: int) -> list[int]:
    """`steps` forward_backward + optim_step pairs, all submitted before any result is read;
    returns the step count after each."""
    futures = [(run.forward_backward([EXAMPLE]), run.optim_step(FAST)) for _ in range(steps)]
    steps_after = []
    for forward_backward, optim_step in futures:
        forward_backward.result(timeout=60)  # raises if it failed
        steps_after.append(optim_step.result(timeout=60).step)
    return steps_after


def score(run, response: str = "hello world") -> float:
    return run.score(PROMPT, [response]).result(timeout=60).scores[0].sum_logprob
