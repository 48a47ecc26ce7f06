"""Training: a run's forward_backward (in length-bucketed micro-batches) and optim_step.

The loss's gradient reaches the adapter through a chunked output projection whose gradient is
written by hand (losses.VocabProjection), so the vocabulary-sized logits never enter the autograd
graph; where the head is not a plain linear layer, through autograd a chunk of positions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..types import AdamParams, Datum, ForwardBackwardResult, LoraConfig, LossFnName, OptimStepResult
from . import losses
from .adapters import Adapters
from .errors import EngineError
from .forward import ForwardPath
from .head_lora import HeadLora
from .head_lora import features as head_features

# Micro-batching: a forward pass costs about this many padded tokens beyond its tokens; and at most
# this many examples share one (bounds the dynamic programme's work).
_MICROBATCH_OVERHEAD_TOKENS = 256
_MAX_MICROBATCH_EXAMPLES = 512


@dataclass
class Run:
    """A training run: its adapter's config and parameters, their AdamW state, and its step."""

    lora: LoraConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """fused: one kernel over all of a run's tensors. On CPU torch's default is a Python loop of
    about ten operations per tensor, and a LoRA on every linear layer has hundreds of tensors."""
    return torch.optim.AdamW(params, lr=AdamParams().learning_rate, fused=True)


def microbatches(data: Sequence[Datum], microbatch_tokens: int) -> list[list[int]]:
    """Length buckets: split the examples, sorted longest first, into micro-batches of at most
    `microbatch_tokens` padded tokens so that padding plus a per-forward overhead is smallest
    (an exact dynamic programme over the sorted order; each bucket lists its longest first)."""
    order = sorted(range(len(data)), key=lambda i: (-len(data[i].model_input.tokens), i))
    lengths = [len(data[i].model_input.tokens) for i in order]
    best = [0] + [math.inf] * len(order)  # best[i]: cost of the first i examples
    start_of = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, max(-1, end - 1 - _MAX_MICROBATCH_EXAMPLES), -1):
            count, width = end - start, lengths[start]
            if count > 1 and width * count > microbatch_tokens:
                break  # earlier starts are only wider and longer
            cost = best[start] + width * count + _MICROBATCH_OVERHEAD_TOKENS
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    batches: list[list[int]] = []
    end = len(order)
    while end > 0:
        batches.append(order[start_of[end] : end])
        end = start_of[end]
    return batches[::-1]


class Trainer:
    def __init__(self, adapters: Adapters, forward: ForwardPath, microbatch_tokens: int):
        self.adapters = adapters
        self.forward = forward
        self.microbatch_tokens = microbatch_tokens  # padded tokens per forward pass in training

    def forward_backward(
        self,
        run_id: str,
        run: Run,
        data: Sequence[Datum],
        loss_fn: LossFnName,
        *,
        loss_fn_config: dict[str, float] | None,
        forward_only: bool,
        all_logprobs: bool,
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of the summed loss into the run's adapter; forward_only: the loss
        and logprobs only. all_logprobs: the logprob of every target token, not only of those whose
        loss term can be nonzero (the others still add nothing to the loss or gradient)."""
        try:
            config = losses.resolve_config(loss_fn, loss_fn_config or {})
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        self.adapters.activate(run_id)
        if forward_only:
            # In eval mode (no dropout) and without a graph: the run's gradients are never touched.
            with torch.no_grad():
                return self._forward(run_id, data, loss_fn, config, backward=False, all_logprobs=all_logprobs)
        # Train mode only switches the LoRA dropout on (the base model's own dropout is never
        # used in training); a run without dropout stays in eval mode, which spares two walks of
        # every module of the model.
        dropout = run.lora.dropout > 0
        model = self.adapters.peft
        assert model is not None  # the run's adapter is on the model
        if dropout:
            model.train()
        # A failure part-way through (e.g. a non-finite loss in a later micro-batch) would leave the
        # earlier micro-batches' gradients accumulated, so the next optim_step would apply a partial
        # batch. Keep a copy of the run's gradients (tiny LoRA tensors) and restore it on error.
        saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in run.params]
        try:
            result = self._forward(run_id, data, loss_fn, config, backward=True, all_logprobs=all_logprobs)
            # A finite loss can still have a non-finite gradient (e.g. ppo with sampler logprobs of
            # -1e308: the clipped term is finite, the ratio is not); applying it would wipe the
            # batch at the next optim_step, so this request fails and the earlier gradients stay.
            grads = [p.grad.view(-1) for p in run.params if p.grad is not None]
            if grads and not bool(torch.isfinite(torch.cat(grads)).all()):  # one check, not one a tensor
                raise EngineError(
                    f"{loss_fn} gave a non-finite gradient (check the request's logprobs and "
                    "advantages); this request's gradient was not applied, earlier ones are kept"
                )
            return result
        except BaseException:
            for param, grad in zip(run.params, saved_grads):
                param.grad = grad
            raise
        finally:
            if dropout:
                model.eval()

    def _forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: LossFnName,
        config: dict[str, float],
        *,
        backward: bool,
        all_logprobs: bool,
    ) -> ForwardBackwardResult:
        total_loss, num_tokens = 0.0, 0
        logprobs: list[list[float | None]] = [[] for _ in data]
        for batch in microbatches(data, self.microbatch_tokens):
            loss, count, batch_logprobs = self._loss_and_backward(
                run_id, batch, data, loss_fn, config, backward, all_logprobs
            )
            total_loss += loss
            num_tokens += count
            for i, row in zip(batch, batch_logprobs):
                logprobs[i] = row
        return ForwardBackwardResult(loss=total_loss, num_tokens=num_tokens, logprobs=logprobs)

    def _loss_and_backward(
        self,
        run_id: str,
        batch: list[int],
        data: Sequence[Datum],
        loss_fn: LossFnName,
        config: dict[str, float],
        backward: bool,
        all_logprobs: bool,
    ):
        forward = self.forward
        examples = [data[i] for i in batch]
        input_ids, attention_mask = forward.right_pad([d.model_input.tokens for d in examples])
        width, device = input_ids.shape[1], forward.base.device
        selected = losses.select_positions(examples, loss_fn, width)  # [B, T] bool
        hidden_B_T_H = forward.hidden_states(run_id, input_ids, attention_mask)
        hidden_N_H = hidden_B_T_H[selected.to(device)]
        inputs = losses.gather_inputs(examples, selected, loss_fn, device)
        if loss_fn == "gspo":
            # The sequence ratio's value needs every masked logprob of an example before any
            # token's loss: one pass without a graph first.
            lp_N = forward.logprobs(hidden_N_H.detach(), inputs.targets, adapter=run_id)[0]
            losses.set_sequence_log_ratios(inputs, lp_N, len(batch))
        if backward:
            total, logprobs_N = self._backward(hidden_N_H, inputs, loss_fn, config, self.adapters.head_lora(run_id))
        else:
            logprobs_N = forward.logprobs(hidden_N_H, inputs.targets, adapter=run_id)[0]
            total = losses.compute(loss_fn, logprobs_N, inputs, slice(None), config).item()
            if not math.isfinite(total):
                raise EngineError(f"{loss_fn} loss is not finite ({total})")
        k = losses.targets_width(examples) if loss_fn == "cross_entropy" else None  # [N, K] targets
        logprobs_B_T = torch.zeros(selected.shape if k is None else (*selected.shape, k))
        logprobs_B_T[selected] = logprobs_N.float().cpu()
        known_B_T = selected
        if all_logprobs:
            # The other positions' logprobs, outside the graph: their loss terms are zero.
            targets_B_T, known_B_T = losses.padded_targets(examples, width, k)
            rest_B_T = known_B_T & ~selected
            with torch.no_grad():
                rest_M_H = hidden_B_T_H.detach()[rest_B_T.to(device)]
                rest_targets = targets_B_T[rest_B_T].to(device)
                logprobs_B_T[rest_B_T] = forward.logprobs(rest_M_H, rest_targets, adapter=run_id)[0].float().cpu()
        return total, int(hidden_N_H.shape[0]), losses.scatter_rows(logprobs_B_T, known_B_T, examples)

    def _backward(
        self,
        hidden_N_H: torch.Tensor,
        inputs: losses.LossInputs,
        loss_fn: LossFnName,
        config: dict[str, float],
        head_lora: HeadLora | None = None,
    ) -> tuple[float, torch.Tensor]:
        """The summed loss and the logprobs [N]; the loss's gradient flows back into the adapter
        (`head_lora`: the run's LoRA on the output head, if it has one)."""

        def chunk_loss(logprobs_C: torch.Tensor, chunk: slice) -> torch.Tensor:
            return losses.compute(loss_fn, logprobs_C, inputs, chunk, config)

        projection = self.forward.projection(head_lora)
        if projection is not None:
            # Chunked output projection in one reused buffer, its gradient written by hand: the
            # vocabulary-sized logits never enter the autograd graph. With a LoRA on the head, what is
            # projected is [hidden, its LoRA down-projection] (head_lora.py).
            if head_lora is not None:
                hidden_N_H = head_features(hidden_N_H, head_lora)
            try:
                total, logprobs_N, grad_N_H = projection.logprobs_and_grad(hidden_N_H, inputs.targets, chunk_loss)
            except losses.NonFiniteLoss as exc:
                raise EngineError(f"{loss_fn} {exc}; no gradient applied") from None
            if hidden_N_H.shape[0]:
                hidden_N_H.backward(grad_N_H)
            return total, logprobs_N
        # Chunked output projection: the vocabulary-wide logits of only a chunk of positions are
        # alive at a time; their gradient flows back into the decoder in one backward pass.
        logits_chunk = self.forward.logits_chunk
        detached = hidden_N_H.detach().requires_grad_(True)
        total = 0.0
        logprobs_N = torch.empty(inputs.targets.shape)
        for start in range(0, hidden_N_H.shape[0], logits_chunk):
            chunk = slice(start, start + logits_chunk)
            token_logprobs = self.forward.target_logprobs(detached[chunk], inputs.targets[chunk], head_lora)
            loss = chunk_loss(token_logprobs, chunk)
            if not torch.isfinite(loss):
                raise EngineError(f"{loss_fn} loss is not finite ({loss.item()}); no gradient applied")
            loss.backward()
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach().float().cpu()
        if hidden_N_H.shape[0]:
            hidden_N_H.backward(detached.grad)
        return total, logprobs_N


def optim_step(run: Run, adam: AdamParams) -> OptimStepResult:
    """One AdamW step of the run's accumulated gradient (clipped to `adam.clip_norm`), then zero it.
    A non-finite gradient norm skips the step and clears the gradients."""
    for group in run.optimizer.param_groups:
        group.update(
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
    max_norm = adam.clip_norm or math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise EngineError(f"gradient norm is {grad_norm}; the step was skipped and gradients cleared")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return OptimStepResult(step=run.step, grad_norm=grad_norm, learning_rate=adam.learning_rate)
