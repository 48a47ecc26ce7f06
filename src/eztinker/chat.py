"""Chat-template rendering shared by the server (prompts given as messages) and the SDK
(supervised examples): one place decides which tokens a model sees and which it is trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from .types import Datum, LossFnInputs, ModelInput


def _as_dicts(messages: Sequence[Any]) -> list[dict[str, str]]:
    return [m if isinstance(m, dict) else m.model_dump() for m in messages]


def render_prompt(tokenizer: Any, messages: Sequence[Any]) -> list[int]:
    """Token ids of `messages` followed by the assistant-turn header, ready for sampling."""
    encoded = tokenizer.apply_chat_template(
        _as_dicts(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def datum_from_messages(tokenizer: Any, messages: Sequence[Any]) -> Datum:
    """A supervised example: the last message is the assistant reply to learn.

    Prompt tokens get weight 0; the reply and its end-of-turn token weight 1. Template text after
    the end-of-turn token (e.g. ChatML's trailing newline) gets weight 0: the model never samples it.
    """
    messages = _as_dicts(messages)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError("messages must end with an assistant reply that follows a prompt")
    prompt = render_prompt(tokenizer, messages[:-1])
    full = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently inside the conversation")
    reply = full[len(prompt) :]
    end_of_turn = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    if end_of_turn in reply:
        reply = reply[: reply.index(end_of_turn) + 1]
    return datum_from_tokens(prompt, reply)


def datum_from_tokens(prompt: list[int], reply: list[int], weight: float = 1.0) -> Datum:
    """Next-token example over prompt + reply; only reply tokens carry loss."""
    tokens = list(prompt) + list(reply)
    weights = [0.0] * (len(prompt) - 1) + [weight] * len(reply)
    return Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=weights),
    )


def loss_weights(datum: Datum) -> list[float]:
    """A supervised example's cross_entropy weights (the datum_from_* functions always set them)."""
    weights = datum.loss_fn_inputs.weights
    if weights is None:
        raise ValueError("the datum has no loss_fn_inputs.weights: not a supervised example")
    if any(isinstance(w, list) for w in weights):
        raise ValueError("the datum has [N, K] loss_fn_inputs.weights: not a supervised example")
    return cast(list[float], weights)
