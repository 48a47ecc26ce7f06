"""The training engine: one base model, one LoRA adapter + AdamW state per training run.

Pure torch + transformers + peft. It knows nothing of HTTP, databases or job ids, and it is not
thread-safe: one caller (the server's worker thread, or a test) drives it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Collection, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import peft
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ..types import (
    AdamParams,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    LossFnName,
    OptimStepResult,
    ResponseScore,
    SampledSequence,
)
from . import (
    lora_adapters,
    losses,
    memory,
    output_projection,
    packed_linear,
    plain_decoder,
    prompt_attention,
    prompt_scoring,
)
from .checkpoints import write_atomically
from .head_lora import HeadLora, HeadLoraProjection
from .head_lora import features as head_features
from .models import BaseModel
from .prompt_scoring import PromptExtras
from .sampler import OutputHead, SampleSpec, sample

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINING_STATE = "training_state.json"
_PEFT_BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
_SNAPSHOT_PREFIX = "snapshot@"  # '@' is never in a run id, so a snapshot's adapter never names a run
# Micro-batching: a forward pass costs about this many padded tokens beyond its tokens; and at most
# this many examples share one (bounds the dynamic programme's work).
_MICROBATCH_OVERHEAD_TOKENS = 256
_MAX_MICROBATCH_EXAMPLES = 512
# Config fields of models whose forward rescales or caps the logits after the output projection.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class EngineError(ValueError):
    """A request the engine cannot carry out (unknown run, mismatched checkpoint, NaN loss...)."""


class InvalidTarget(EngineError):
    """A LoRA target module the model cannot take; `index` is its position in the list (None:
    the whole `target_modules` value)."""

    def __init__(self, index: int | None, message: str):
        super().__init__(message)
        self.index = index


@dataclass
class _Run:
    lora: LoraConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0


@dataclass
class PromptLogprobs:
    """Per prompt position i: log p(prompt[i] | prompt[:i]) and, if asked, the k most likely
    [token_id, logprob] pairs of that distribution (most likely first). Position 0 has neither."""

    logprobs: list[float | None]
    topk: list[list[list] | None] | None
    extras: prompt_scoring.ExtrasResult | None = None  # what PromptExtras asked for


# peft 0.21's LoraLayer.update_layer(adapter_name, r, lora_alpha, config, **kwargs); older
# versions take the config's fields one by one, and the engine then uses peft's add_adapter.
_UPDATE_LAYER_TAKES_CONFIG = "config" in inspect.signature(peft.tuners.lora.LoraLayer.update_layer).parameters


def _adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """fused: one kernel over all of a run's tensors. On CPU torch's default is a Python loop of
    about ten operations per tensor, and a LoRA on every linear layer has hundreds of tensors
    (420 on SmolLM2)."""
    return torch.optim.AdamW(params, lr=AdamParams().learning_rate, fused=True)


class Engine:
    def __init__(
        self,
        base: BaseModel,
        *,
        microbatch_tokens: int | None = None,
        logits_chunk: int = 1024,
        max_snapshots: int = 16,
        pack_weights: bool = True,
        activation_checkpointing: bool | None = None,
    ):
        """microbatch_tokens: padded tokens per training forward (None: sized from the device's free
        memory, memory.py; 8192 on the CPU). activation_checkpointing (None: on where it pays, on an
        accelerator, whose memory bounds the micro-batch; on the CPU it would only cost time)."""
        self.base = base
        self.logits_chunk = logits_chunk  # positions per output-projection chunk
        self.max_snapshots = max_snapshots  # checkpoint adapters kept loaded for sampling
        self._peft: peft.PeftModel | None = None
        self._runs: dict[str, _Run] = {}
        # Snapshot adapter name -> the stamp of the checkpoint files it was loaded from, least recently used first.
        self._snapshots: OrderedDict[str, tuple] = OrderedDict()
        self._head: OutputHead | None = None
        self._head_checked = False
        self._lora_targets: tuple[list[str], list[str]] | None = None
        self._lora_layer_list: list[peft.tuners.lora.LoraLayer] | None = None
        self._head_layer: peft.tuners.lora.LoraLayer | None = None  # the output head's, once wrapped
        self._head_name: str | None = None
        self._plain: plain_decoder.PlainDecoder | None = None
        self._plain_checked = False
        # Base weights packed for oneDNN (packed_linear.py), by id of the weight (kept alive beside).
        self.pack_weights = pack_weights
        self._packs: dict[int, tuple[torch.Tensor, packed_linear.PackedWeight | None]] = {}
        # Pack (and time, packed_linear.py) the weights now, not in the first call.
        self._plain_decoder()
        self._output_head()
        if activation_checkpointing is None:
            activation_checkpointing = base.device.type != "cpu"
        # Only PlainDecoder's forward checkpoints (transformers' layers do so in train mode only).
        self.activation_checkpointing = activation_checkpointing and self._plain is not None
        if microbatch_tokens is None:
            microbatch_tokens = memory.default_microbatch_tokens(
                base.model.config, base.model.dtype, base.device, self.activation_checkpointing
            )
        self.microbatch_tokens = microbatch_tokens  # padded tokens per forward pass in training

    # ------------------------------------------------------------------------------- runs
    def create_run(self, run_id: str, lora: LoraConfig, seed: int = 0) -> None:
        if run_id in self._runs:
            raise EngineError(f"run {run_id} already exists")
        self._add_adapter(run_id, lora, seed)
        params = lora_adapters.parameters(self._lora_layers(), run_id)
        self._runs[run_id] = _Run(lora=lora, params=params, optimizer=_adamw(params))

    def delete_run(self, run_id: str) -> None:
        self._run(run_id)
        del self._runs[run_id]
        self._remove_adapter(run_id)

    def close(self) -> None:
        """Drop every run and snapshot: the base model is as it was loaded."""
        self._runs.clear()
        self._snapshots.clear()
        self._modules_changed()
        self._packs.clear()  # the packed copies of the base weights: the weights' memory again
        if self._peft is not None:
            self._peft.unload()
            self._peft = None

    def _modules_changed(self, layers: bool = True) -> None:
        """Adapters were added or removed (on the same `layers`, or not): the module walks below
        are redone when next needed."""
        if layers:
            self._lora_layer_list = None
            self._head_layer = None
        self._plain, self._plain_checked = None, False

    def _lora_layers(self) -> list[peft.tuners.lora.LoraLayer]:
        """The model's LoRA layers, walked for once per change of adapters (a walk of all SmolLM2's
        modules costs about 12 ms, and every sampling call needs the list)."""
        if self._lora_layer_list is None:
            assert self._peft is not None  # asked for only once an adapter exists
            self._lora_layer_list = [m for m in self._peft.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        return self._lora_layer_list

    def _add_adapter(self, name: str, lora: LoraConfig, seed: int) -> None:
        config = peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works (alpha / r)
            lora_dropout=lora.dropout,
            target_modules=self._peft_targets(lora),
            base_model_name_or_path=self.base.name,
        )
        # Seeded adapter init (lora_A is random, lora_B zero) without touching the global RNG.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # A LoRA on a head tied to the embeddings: peft warns of merging, which export.py unties first.
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            torch.manual_seed(seed)
            try:
                if self._peft is None:
                    self._modules_changed()
                    self._peft = peft.get_peft_model(self.base.model, config, adapter_name=name)
                    self._peft.eval()  # a new PeftModel is in train mode; the engine's model is not
                elif self._add_to_wrapped_layers(name, config, lora):
                    self._modules_changed(layers=False)
                else:
                    self._modules_changed()
                    self._peft.add_adapter(name, config)
            except ValueError as exc:  # e.g. target modules that do not exist in this model
                raise EngineError(f"lora.target_modules: {exc}") from exc
        # New modules start in train mode; the engine's model is in eval mode but within a
        # training call, so a new run's dropout must not act when it samples or scores first.
        for layer in self._lora_layers():
            if name in layer.lora_dropout:
                layer.lora_dropout[name].eval()

    def _peft_targets(self, lora: LoraConfig) -> str | list[str]:
        """peft's target_modules for `lora`. With train_unembed, the output head's module name after the
        others' ('all-linear' spelt out by name: peft's 'all-linear' leaves the head out)."""
        if not lora.train_unembed:
            return lora.target_modules
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        names = lora.target_modules
        if names == "all-linear":
            names = sorted({name.rsplit(".", 1)[-1] for name in self._lora_targets[0]})
        return [*names, self._output_head_name()]

    def _output_head_name(self) -> str:
        if self._head_name is None:
            head = self.base.model.get_output_embeddings()
            self._head_name = next(name for name, module in self.base.model.named_modules() if module is head)
        return self._head_name

    def _head_lora_layer(self) -> peft.tuners.lora.LoraLayer | None:
        """The peft LoRA layer wrapping the output head, if an adapter has put one there."""
        if self._head_layer is None and self._peft is not None:
            head = self.base.model.get_output_embeddings()
            self._head_layer = head if isinstance(head, peft.tuners.lora.LoraLayer) else None
        return self._head_layer

    def _head_lora(self, adapter: str | None) -> HeadLora | None:
        """`adapter`'s LoRA on the output head (train_unembed), or None."""
        return HeadLora.of(self._head_lora_layer(), adapter)

    def _head_linear(self) -> torch.nn.Module:
        """The output head's own layer, without any LoRA."""
        head = self.base.model.get_output_embeddings()
        return head.get_base_layer() if isinstance(head, peft.tuners.lora.LoraLayer) else head

    def _add_to_wrapped_layers(self, name: str, config: peft.LoraConfig, lora: LoraConfig) -> bool:
        """peft's add_adapter walks every module of the model, earlier adapters' LoRA modules
        included, so creating a run grew with the runs loaded (SmolLM2: 0.24 s with none, 0.57 s
        with ten). When every layer the targets name is already a LoRA layer, this adds the adapter
        to those layers as peft's add_adapter does for them (in module order, so the seeded init
        is the same): `lora_adapters.add` where it can, else `update_layer`. False (peft's own
        path) otherwise, or on a peft whose `update_layer` takes other arguments."""
        if not _UPDATE_LAYER_TAKES_CONFIG:
            return False
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        targets = lora.target_modules
        names = [n for n in self._lora_targets[0] if _targets(n, targets)]
        if lora.train_unembed:
            names.append(self._output_head_name())  # the last module of a causal LM, as in peft's walk
        modules = [self.base.model.get_submodule(n) for n in names]
        if not modules or not all(isinstance(module, peft.tuners.lora.Linear) for module in modules):
            return False
        layers = cast("list[peft.tuners.lora.Linear]", modules)  # each one's type checked above
        assert self._peft is not None  # only called to add to an existing PeftModel
        self._peft.peft_config[name] = config
        try:
            if lora_adapters.can_add(layers, config):
                for layer in layers:
                    lora_adapters.add(layer, name, config)
            else:
                for key, layer in zip(names, layers):
                    layer.update_layer(name, config.r, lora_alpha=config.lora_alpha, target_name=key, config=config)
        except BaseException:
            for layer in layers:
                if name in layer.lora_A:
                    layer.delete_adapter(name)
            del self._peft.peft_config[name]
            raise
        return True

    def _remove_adapter(self, name: str) -> None:
        assert self._peft is not None  # the run's adapter is on the model
        self._modules_changed()
        if len(self._peft.peft_config) > 1:
            self._peft.delete_adapter(name)
        else:
            # peft cannot add an adapter after its last one is deleted: strip the LoRA layers
            # (the base weights are untouched and never copied) and wrap afresh next time.
            self._peft.unload()
            self._peft = None

    def check_target_modules(self, target_modules: str | list[str]) -> None:
        """Refuse LoRA targets that would break the shared model, before peft sees them: peft
        accepts some that break it for everyone. ['embed_tokens'] fails half-way and leaves every
        run on the model (existing and new) unable to train or sample; 'lm_head' makes a run that
        can never train (`train_unembed` adapts the head); ['q_proj', 'mlp'] leaves stray layers
        behind; a string other than 'all-linear' is taken as a regular expression. Raises
        InvalidTarget naming the entry."""
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        linear, other = self._lora_targets
        choices = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
        if isinstance(target_modules, str):
            if target_modules != "all-linear":
                raise InvalidTarget(None, f"target_modules must be 'all-linear' or a list of module names ({choices})")
            return
        for i, key in enumerate(target_modules):
            bad = next((name for name in other if _targets(name, [key])), None)
            if bad is not None:
                head = " (set train_unembed for a LoRA on the output head)" if bad == self._output_head_name() else ""
                raise InvalidTarget(
                    i,
                    f"target module {key!r} matches {bad!r}, which is not a LoRA-trainable "
                    f"linear layer{head}; choose from {choices}",
                )
            if not any(_targets(name, [key]) for name in linear):
                raise InvalidTarget(i, f"target module {key!r} is not in the model; choose from {choices}")

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def step_of(self, run_id: str) -> int:
        return self._run(run_id).step

    def _run(self, run_id: str) -> _Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise EngineError(f"unknown run {run_id}") from None

    def _activate(self, run_id: str) -> None:
        assert self._peft is not None  # the run's adapter is on the model
        if self._peft.active_adapters != [run_id]:  # set_adapter walks every module: skip if a no-op
            self._peft.set_adapter(run_id)

    def _through(self, adapter: str | None):
        """A context in which the model's forward goes through `adapter` (None: the bare model)."""
        if self._peft is None:
            return nullcontext()
        if adapter is None:
            return _base_only(self._lora_layers())
        self._activate(adapter)
        return nullcontext()

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._snapshots:
            self._run(adapter)

    # --------------------------------------------------------------------------- training
    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: LossFnName = "cross_entropy",
        *,
        loss_fn_config: dict[str, float] | None = None,
        forward_only: bool = False,
        all_logprobs: bool = False,
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of the summed loss into the run's adapter; forward_only: the loss
        and logprobs only. all_logprobs: the logprob of every target token, not only of those whose
        loss term can be nonzero (the others still add nothing to the loss or gradient)."""
        run = self._run(run_id)
        self._check_tokens(data)
        try:
            config = losses.resolve_config(loss_fn, loss_fn_config or {})
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        self._activate(run_id)
        if forward_only:
            # In eval mode (no dropout) and without a graph: the run's gradients are never touched.
            with torch.no_grad():
                return self._forward(run_id, data, loss_fn, config, backward=False, all_logprobs=all_logprobs)
        # Train mode only switches the LoRA dropout on (the base model's own dropout is never
        # used in training); a run without dropout stays in eval mode, which spares two walks of
        # every module of the model (about 15 ms a call on SmolLM2).
        dropout = run.lora.dropout > 0
        assert self._peft is not None  # the run's adapter is on the model
        if dropout:
            self._peft.train()
        # A failure part-way through (e.g. a non-finite loss in a later micro-batch) would leave the
        # earlier micro-batches' gradients accumulated, so the next optim_step would apply a partial
        # batch. Snapshot the run's gradients (tiny LoRA tensors) and restore them on error.
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
                self._peft.eval()

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
        for batch in self._microbatches(data):
            loss, count, batch_logprobs = self._loss_and_backward(
                run_id, batch, data, loss_fn, config, backward, all_logprobs
            )
            total_loss += loss
            num_tokens += count
            for i, row in zip(batch, batch_logprobs):
                logprobs[i] = row
        return ForwardBackwardResult(loss=total_loss, num_tokens=num_tokens, logprobs=logprobs)

    def _microbatches(self, data: Sequence[Datum]) -> list[list[int]]:
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
                if count > 1 and width * count > self.microbatch_tokens:
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
        examples = [data[i] for i in batch]
        input_ids, attention_mask = self._right_pad([d.model_input.tokens for d in examples])
        width, device = input_ids.shape[1], self.base.device
        selected = losses.select_positions(examples, loss_fn, width)  # [B, T] bool
        hidden_B_T_H = self._hidden_states(run_id, input_ids, attention_mask)
        hidden_N_H = hidden_B_T_H[selected.to(device)]
        inputs = losses.gather_inputs(examples, selected, loss_fn, device)
        if loss_fn == "gspo":
            # The sequence ratio's value needs every masked logprob of an example before any
            # token's loss: one pass without a graph first.
            lp_N = self._logprobs(hidden_N_H.detach(), inputs.targets, adapter=run_id)[0]
            losses.set_sequence_log_ratios(inputs, lp_N, len(batch))
        if backward:
            total, logprobs_N = self._backward(hidden_N_H, inputs, loss_fn, config, self._head_lora(run_id))
        else:
            logprobs_N = self._logprobs(hidden_N_H, inputs.targets, adapter=run_id)[0]
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
                logprobs_B_T[rest_B_T] = self._logprobs(rest_M_H, rest_targets, adapter=run_id)[0].float().cpu()
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

        projection = self._projection(head_lora)
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
        # Chunked output projection: the 152k-wide logits of only a chunk of positions are alive
        # at a time; their gradient flows back into the decoder in one backward pass.
        detached = hidden_N_H.detach().requires_grad_(True)
        total = 0.0
        logprobs_N = torch.empty(inputs.targets.shape)
        for start in range(0, hidden_N_H.shape[0], self.logits_chunk):
            chunk = slice(start, start + self.logits_chunk)
            token_logprobs = self._target_logprobs(detached[chunk], inputs.targets[chunk], head_lora)
            loss = chunk_loss(token_logprobs, chunk)
            if not torch.isfinite(loss):
                raise EngineError(f"{loss_fn} loss is not finite ({loss.item()}); no gradient applied")
            loss.backward()
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach().float().cpu()
        if hidden_N_H.shape[0]:
            hidden_N_H.backward(detached.grad)
        return total, logprobs_N

    def _projection(self, head_lora: HeadLora | None = None) -> losses.VocabProjection | None:
        """The fast output projection (None where the head is not a plain linear one); with `head_lora`,
        it projects `head_lora.features(hidden, head_lora)` (head_lora.py)."""
        head = self._output_head()
        if head is None:
            return None
        if head_lora is not None:
            return HeadLoraProjection(head.weight, head.bias, self.logits_chunk, head.packed, head_lora)
        return losses.VocabProjection(head.weight, head.bias, self.logits_chunk, head.packed)

    def _decoder(self) -> torch.nn.Module:
        model = self.base.model
        return getattr(model, model.base_model_prefix)

    def _target_logprobs(
        self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, head_lora: HeadLora | None = None
    ) -> torch.Tensor:
        logits = self._head_linear()(hidden_N_H).float()
        if head_lora is not None:
            logits = head_lora.logits(logits, hidden_N_H)
        return torch.log_softmax(logits, dim=-1).gather(-1, losses.two_d(targets_N)).reshape(targets_N.shape)

    @torch.no_grad()
    def _logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, topk: int = 0, *, adapter: str | None):
        """Target logprobs [N], the k largest logprobs [N, k] and their token ids [N, k], no graph, under
        `adapter`'s LoRA on the output head if it has one (its LoRAs elsewhere made the hidden states)."""
        head_lora = self._head_lora(adapter)
        projection = self._projection(head_lora)
        if projection is not None:
            features = hidden_N_H if head_lora is None else head_features(hidden_N_H, head_lora)
            return projection.logprobs(features, targets_N, topk)
        n, device = hidden_N_H.shape[0], hidden_N_H.device
        logprobs_N = torch.empty(targets_N.shape, device=device)
        top_N_K = torch.empty(n, topk, device=device)
        ids_N_K = torch.empty(n, topk, dtype=torch.long, device=device)
        head = self._head_linear()
        for start in range(0, n, self.logits_chunk):
            chunk = slice(start, start + self.logits_chunk)
            logits = head(hidden_N_H[chunk]).float()
            if head_lora is not None:
                logits = head_lora.logits(logits, hidden_N_H[chunk])
            logprobs_C_V = torch.log_softmax(logits, dim=-1)
            logprobs_N[chunk] = logprobs_C_V.gather(-1, losses.two_d(targets_N[chunk])).reshape(targets_N[chunk].shape)
            if topk:
                top_N_K[chunk], ids_N_K[chunk] = logprobs_C_V.topk(topk, dim=-1)
        return logprobs_N, top_N_K, ids_N_K

    def optim_step(self, run_id: str, adam: AdamParams) -> OptimStepResult:
        run = self._run(run_id)
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

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, specs: list[SampleSpec]) -> list[list[list[SampledSequence]]]:
        """Candidates for many requests, of one or several runs or snapshots (or the base model),
        in one batch."""
        for spec in specs:
            self._check_adapter(spec.adapter)
            self._check_prompts(spec.prompts)
        head = self._output_head()
        adapters = {spec.adapter for spec in specs if spec.adapter is not None}
        stacked = self._stacked_lora(adapters) if head is not None else None
        head_loras = {a: lora for a in adapters if (lora := self._head_lora(a)) is not None}
        if head is not None and head_loras:
            head = dataclasses.replace(head, loras=head_loras)
        with stacked if stacked is not None else nullcontext():
            return sample(
                self._features_fn(stacked) if stacked is not None else self._logits_fn(),
                self.base.tokenizer,
                specs,
                stop_token_ids=self.base.stop_token_ids,
                pad_token_id=self.base.pad_token_id,
                device=self.base.device,
                head=head if stacked is not None else None,
                share_prompts=prompt_attention.supports(self.base.model.config),
            )

    def _stacked_lora(self, adapters: set[str]) -> _StackedLora | None:
        """The fast sampling path's LoRA, when it reproduces peft's (no dropout: sampling is in eval mode)."""
        if self._peft is None:
            return _StackedLora([], set())
        if not self._plain_lora(adapters):
            return None
        # The head's LoRA is the sampler's to add (OutputHead.loras): the model's head is never called here.
        head = self._head_lora_layer()
        return _StackedLora([layer for layer in self._lora_layers() if layer is not head], adapters)

    def _plain_lora(self, adapters: set[str]) -> bool:
        """Whether these adapters are plain LoRA on linear layers (no DoRA-like variants, no LoRA
        bias, not merged), which is what the engine's own LoRA updates compute."""
        for module in self._lora_layers():
            if not isinstance(module, peft.tuners.lora.Linear) or module.merged:
                return False
            for name in adapters & set(module.lora_A):
                if name in module.lora_variant or module.lora_B[name].bias is not None:
                    return False
        return True

    def _hidden_states(
        self, adapter: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The final hidden states [B, T, H] of right-padded sequences through `adapter` (a run's
        or a snapshot's LoRA, None: the bare model): by `PlainDecoder` where it computes this model
        and adapter, else through transformers' and peft's modules."""
        plain = self._plain_decoder()
        if plain is not None and (adapter is None or self._plain_lora({adapter})):
            lora = None if adapter is None else _RunLora(self._lora_layers(), adapter)
            return plain.causal(input_ids, lora, self.activation_checkpointing)
        with self._through(adapter):
            return self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _plain_decoder(self) -> plain_decoder.PlainDecoder | None:
        """The decoder as plain tensor ops, where `PlainDecoder` computes this model (else None);
        built once per change of adapters (the first adapter wraps every projection in peft's
        LoRA layer), since checking and collecting 30 layers' parameters took 4-5 ms a call."""
        if not self._plain_checked:
            decoder, config = self._decoder(), self.base.model.config
            supported = plain_decoder.supports(decoder, config)
            self._plain = plain_decoder.PlainDecoder(decoder, config, self._packed) if supported else None
            self._plain_checked = True
        return self._plain

    def _packed(self, weight: torch.Tensor, head: bool = False) -> packed_linear.PackedWeight | None:
        """A base weight's packed copy for oneDNN (`head`: the output projection's, timed against
        its column blocks), made once; None where it does not apply or was not faster here."""
        if not self.pack_weights:
            return None
        if id(weight) not in self._packs:
            self._packs[id(weight)] = (
                weight,
                output_projection.pack_head(weight) if head else packed_linear.pack(weight),
            )
        return self._packs[id(weight)][1]

    def _features_fn(self, stacked: _StackedLora):
        """Forward to the final hidden state of the last position; the sampler projects it itself.
        The prefill and decode steps of the models it covers go through `PlainDecoder`."""
        plain = self._plain_decoder()

        def forward(input_ids, attention_mask, position_ids, cache, adapters):
            stacked.set_rows(adapters, input_ids.shape[1])
            if plain is not None:  # one token a row: a decode step (or one-token prompts' prefill); wider: a prefill
                step = plain.decode if input_ids.shape[1] == 1 else plain.prefill
                return step(input_ids, attention_mask, position_ids, cache, stacked)
            with self._attention_for(cache):
                hidden = self._decoder()(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state
            return hidden[:, -1]

        return forward

    def _logits_fn(self):
        """Forward through the whole model (for heads the sampler cannot reproduce)."""

        def forward(input_ids, attention_mask, position_ids, cache, adapters):
            with self._attention_for(cache):
                return through_model(input_ids, attention_mask, position_ids, cache, adapters)

        def through_model(input_ids, attention_mask, position_ids, cache, adapters):
            kwargs = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            distinct = set(adapters)
            if self._peft is None:
                return self.base.model(**kwargs).logits[:, -1]
            if distinct == {None}:
                with _base_only(self._lora_layers()):
                    return self._peft(**kwargs).logits[:, -1]
            if len(distinct) == 1:
                self._activate(adapters[0])
                return self._peft(**kwargs).logits[:, -1]
            names = [_PEFT_BASE_ROW if a is None else a for a in adapters]
            return self._peft(**kwargs, adapter_names=names).logits[:, -1]

        return forward

    def _attention_for(self, cache):
        """Decode steps over a SharedPromptCache read it through its own attention."""
        if isinstance(cache, prompt_attention.SharedPromptCache):
            return prompt_attention.attending(cache, self.base.model.config)
        return nullcontext()

    def _output_head(self) -> OutputHead | None:
        """The model's output projection when the sampler may apply it to the final hidden state
        itself (a plain linear layer, checked once against the model's own logits); else None."""
        if self._head_checked:
            return self._head
        self._head_checked = True
        linear = self._head_linear()
        config = self.base.model.config
        if type(linear) is not torch.nn.Linear or any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING
        ):
            return None
        head = OutputHead(linear.weight, linear.bias, self._packed(linear.weight, head=True))
        probe = torch.tensor([[self.base.pad_token_id, min(1, self.base.vocab_size - 1)]], device=self.base.device)
        context = _base_only(self._lora_layers()) if self._peft is not None else nullcontext()
        with torch.no_grad(), context:
            want = self.base.model(input_ids=probe, logits_to_keep=1).logits[:, -1].float()
            hidden = self._decoder()(input_ids=probe).last_hidden_state[:, -1]
            got = head.logits(hidden, torch.empty_like(want))
        if head_matches(got, want, linear.weight.dtype):
            self._head = head
        return self._head

    @torch.no_grad()
    def score(self, run_id: str | None, prompt: list[int], responses: list[list[int]]) -> list[ResponseScore]:
        """Logprob of each response given the prompt, under the run's adapter (or the base model).
        Responses go through in micro-batches of at most `microbatch_tokens` padded tokens (one
        response at least), longest first, so memory is bounded however many there are."""
        if run_id is not None:
            self._run(run_id)
        # Errors name the fields the caller actually passed, not positions in a combined list
        # ("prompts[0]" for the prompt, "prompts[k]" for a response, k shifted past empty ones).
        self._check_ids(prompt, "prompt")
        for i, response in enumerate(responses):
            self._check_ids(response, f"responses[{i}]")
        order = sorted(range(len(responses)), key=lambda i: -len(responses[i]))
        batches: list[list[int]] = []
        for i in order:  # the first of a batch is its widest
            width = len(prompt) + len(responses[batches[-1][0]]) if batches else 0
            if batches and (len(batches[-1]) + 1) * width <= self.microbatch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        logprobs: list[torch.Tensor] = [torch.empty(0)] * len(responses)
        for batch in batches:
            chunk = [responses[i] for i in batch]
            input_ids, attention_mask = self._right_pad([prompt + r for r in chunk])
            positions = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, r in enumerate(chunk):
                positions[row, len(prompt) - 1 : len(prompt) - 1 + len(r)] = True
            targets = torch.cat(
                [torch.tensor(r, dtype=torch.long) for r in chunk if r] or [torch.empty(0, dtype=torch.long)]
            )
            hidden = self._hidden_states(run_id, input_ids, attention_mask)
            hidden_N_H, targets = hidden[positions.to(hidden.device)], targets.to(hidden.device)
            chunk_logprobs = self._logprobs(hidden_N_H, targets, adapter=run_id)[0].cpu()
            offset = 0
            for i, r in zip(batch, chunk):
                logprobs[i] = chunk_logprobs[offset : offset + len(r)]
                offset += len(r)
        scores = []
        for r, lp in zip(responses, logprobs):
            total = float(lp.sum()) if len(r) else 0.0
            scores.append(ResponseScore(sum_logprob=total, mean_logprob=total / max(len(r), 1), num_tokens=len(r)))
        return scores

    @torch.no_grad()
    def prompt_logprobs(
        self,
        adapter: str | None,
        prompts: list[list[int]],
        topk: int = 0,
        last_n: int | None = None,
        extras: list[PromptExtras] | None = None,
    ) -> list[PromptLogprobs]:
        """Per prompt, the logprob (temperature 1) of each of its tokens given the tokens before it,
        and with topk > 0 the k most likely tokens there, under a run's or snapshot's adapter (or
        the bare model). `last_n`: only each prompt's last n tokens are scored (the rest None).
        `extras` (one per prompt): target ids' logprobs and draws at every position (prompt_scoring.py)."""
        self._check_adapter(adapter)
        self._check_prompts(prompts)
        if not all(prompts):
            raise EngineError(f"prompts[{prompts.index([])}] is empty")
        if topk > self.base.vocab_size:
            raise EngineError(f"topk_prompt_logprobs {topk} exceeds the vocabulary size {self.base.vocab_size}")
        input_ids, attention_mask = self._right_pad(prompts)
        scored = [len(p) - 1 if last_n is None else min(last_n, len(p) - 1) for p in prompts]
        positions_B_T = torch.zeros(input_ids.shape, dtype=torch.bool)  # position t predicts token t + 1
        for i, (p, n) in enumerate(zip(prompts, scored)):
            positions_B_T[i, len(p) - 1 - n : len(p) - 1] = True
        targets_N = torch.tensor(
            [t for p, n in zip(prompts, scored) for t in p[len(p) - n :]], dtype=torch.long, device=input_ids.device
        )
        hidden = self._hidden_states(adapter, input_ids, attention_mask)
        logprobs_N, top_N_K, ids_N_K = self._logprobs(
            hidden[positions_B_T.to(hidden.device)], targets_N, topk, adapter=adapter
        )
        logprobs, top, ids = logprobs_N.tolist(), top_N_K.tolist(), ids_N_K.tolist()
        results, offset = [], 0
        for i, (p, n) in enumerate(zip(prompts, scored)):
            rows = range(offset, offset + n)
            offset += n
            unscored = [None] * (len(p) - n)
            extra = None
            if extras is not None and (extras[i].targets is not None or extras[i].alt_k):
                extra = prompt_scoring.score_prompt(
                    hidden[i, : len(p) - 1],
                    extras[i],
                    functools.partial(self._log_softmax, adapter=adapter),
                    prompt_scoring.rows_per_chunk(self.base.vocab_size),
                )
            results.append(
                PromptLogprobs(
                    logprobs=unscored + [logprobs[r] for r in rows],
                    topk=unscored + [[[t, lp] for t, lp in zip(ids[r], top[r])] for r in rows] if topk else None,
                    extras=extra,
                )
            )
        return results

    def _log_softmax(self, hidden_C_H: torch.Tensor, *, adapter: str | None) -> torch.Tensor:
        """The model's logprobs (temperature 1) over the vocabulary [C, V] at these final hidden states,
        `adapter`'s LoRA on the output head included if it has one."""
        logits = self._head_linear()(hidden_C_H).float()
        head_lora = self._head_lora(adapter)
        if head_lora is not None:
            logits = head_lora.logits(logits, hidden_C_H)
        return torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------------- snapshots
    def snapshot(self, directory: Path, pinned: Collection[str] = ()) -> str:
        """The adapter (for SampleSpec.adapter) of checkpoint `directory`'s weights, fixed whatever
        its run trains next: loaded once, and again only when the checkpoint was saved over. At
        most `max_snapshots` stay loaded, the least recently used go first, never one in `pinned`
        (those of the batch being prepared). A snapshot is no run: nothing trains or saves it."""
        directory = directory.resolve()
        name = _SNAPSHOT_PREFIX + hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        try:
            stamp = _stamp(directory)
        except OSError as exc:
            if name in self._snapshots:  # its checkpoint is gone
                self._drop_snapshot(name)
            raise EngineError(f"{directory} is not a readable EZTinker checkpoint: {exc}") from None
        if name in self._snapshots:
            if self._snapshots[name] == stamp:
                self._snapshots.move_to_end(name)
                return name
            self._drop_snapshot(name)  # saved over since: load the new weights
        self._load_snapshot(name, directory)
        self._snapshots[name] = stamp
        evictable = [n for n in self._snapshots if n != name and n not in pinned]
        for old in evictable[: max(0, len(self._snapshots) - self.max_snapshots)]:
            self._drop_snapshot(old)
        return name

    def _load_snapshot(self, name: str, directory: Path) -> None:
        state = read_training_state(directory)
        if state.get("base_model") not in (None, self.base.name):
            raise EngineError(
                f"checkpoint {directory} is of base model {state['base_model']!r}, not {self.base.name!r}"
            )
        try:
            lora = LoraConfig.model_validate(state["lora"])
        except (KeyError, ValueError) as exc:
            raise EngineError(f"checkpoint {directory} has no valid LoRA config: {exc}") from None
        try:
            weights = load_file(directory / ADAPTER_WEIGHTS, device=str(self.base.device))
        except Exception as exc:
            raise EngineError(
                f"checkpoint {directory}: {ADAPTER_WEIGHTS} cannot be read ({type(exc).__name__}: {exc})"
            ) from None
        self._add_adapter(name, lora, seed=0)
        try:
            result = peft.set_peft_model_state_dict(self._peft, weights, adapter_name=name)
            # torch's _IncompatibleKeys (load_state_dict's result) is a namedtuple mypy cannot see into.
            missing_keys: list[str] = result.missing_keys  # type: ignore[attr-defined]
            missing = [k for k in missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise EngineError(
                    f"checkpoint {directory} is missing {len(missing)} adapter tensors, e.g. {missing[0]}"
                )
        except RuntimeError as exc:  # tensors of other shapes than its LoRA config's
            self._remove_adapter(name)
            raise EngineError(f"checkpoint {directory} does not match its LoRA config: {exc}") from None
        except BaseException:
            self._remove_adapter(name)
            raise

    def _drop_snapshot(self, name: str) -> None:
        del self._snapshots[name]
        self._remove_adapter(name)

    # ------------------------------------------------------------------------- checkpoints
    def save(self, run_id: str, directory: Path, *, with_optimizer: bool = True) -> None:
        """Adapter in PEFT's own format + optimizer state + step, written atomically. Without
        the optimizer state (`with_optimizer` False: weights for sampling or export), Adam's two
        moments per parameter are left out: two thirds of a checkpoint's bytes."""
        run = self._run(run_id)
        # save_embedding_layers: peft would otherwise add the whole (base) output head and embeddings
        # to the adapter of a run with a LoRA on the head, since "lm_head" is among its targets.
        assert self._peft is not None  # the run's adapter is on the model
        state = peft.get_peft_model_state_dict(self._peft, adapter_name=run_id, save_embedding_layers=False)
        config = self._peft.peft_config[run_id]

        def write(staging: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, staging / ADAPTER_WEIGHTS)
            config.save_pretrained(str(staging))
            if with_optimizer:
                torch.save(run.optimizer.state_dict(), staging / OPTIMIZER_STATE)
            (staging / TRAINING_STATE).write_text(
                json.dumps(
                    {
                        "step": run.step,
                        "lora": run.lora.model_dump(),
                        "base_model": self.base.name,
                        "optimizer": with_optimizer,
                    }
                )
            )

        write_atomically(directory, write)

    def load(self, run_id: str, directory: Path, *, with_optimizer: bool = True) -> int:
        """Replace the run's adapter, optimizer state and step with the checkpoint's (without the
        optimizer state when `with_optimizer` is False: the moments then start from zero).

        Every file is read before anything is applied, so a bad checkpoint fails with a clear
        error and leaves the run untouched (rather than a bare "SafetensorError" after the adapter
        is replaced but before the optimizer state is)."""
        run = self._run(run_id)
        verify_checkpoint(directory)
        saved = read_training_state(directory)
        if with_optimizer and not saved.get("optimizer", True):
            raise EngineError(
                f"checkpoint {_ref(directory)} holds weights only (saved for sampling or export), "
                "no optimizer state: load it without the optimizer state"
            )
        if LoraConfig.model_validate(saved["lora"]) != run.lora:  # a field added since has its default
            raise EngineError(
                f"checkpoint LoRA config {saved['lora']} does not match the run's {run.lora.model_dump()}"
            )
        weights = load_file(directory / ADAPTER_WEIGHTS, device=str(self.base.device))
        result = peft.set_peft_model_state_dict(self._peft, weights, adapter_name=run_id)
        # torch's _IncompatibleKeys (load_state_dict's result) is a namedtuple mypy cannot see into.
        missing_keys: list[str] = result.missing_keys  # type: ignore[attr-defined]
        missing = [k for k in missing_keys if f".{run_id}." in k and "lora_" in k]
        if missing:
            raise EngineError(f"checkpoint is missing {len(missing)} adapter tensors, e.g. {missing[0]}")
        # weights_only: a checkpoint can never run code on the server.
        if with_optimizer:
            optimizer_state = torch.load(directory / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
            run.optimizer.load_state_dict(optimizer_state)
        else:
            run.optimizer = _adamw(run.params)
        run.optimizer.zero_grad(set_to_none=True)
        run.step = int(saved["step"])
        return run.step

    # ------------------------------------------------------------------------------ helpers
    def _right_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.base.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return input_ids.to(self.base.device), attention_mask.to(self.base.device)

    def _check_tokens(self, data: Sequence[Datum]) -> None:
        for i, datum in enumerate(data):
            self._check_ids(datum.model_input.tokens, f"data[{i}].model_input.tokens")
            self._check_ids(datum.loss_fn_inputs.flat_target_tokens(), f"data[{i}].loss_fn_inputs.target_tokens")

    def _check_prompts(self, prompts: Sequence[list[int]]) -> None:
        for i, tokens in enumerate(prompts):
            self._check_ids(tokens, f"prompts[{i}]")

    def _check_ids(self, tokens: Sequence[int], field: str) -> None:
        vocab = self.base.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")


def head_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the head's logits `got` are the model's `want` to the rounding of `dtype`: 1e-4 in
    float32; a few units in the last place of bf16's 8-bit mantissa (2^-7 = 0.8%) in bf16, whose
    logits two orders of summation may round apart (a 1e-4 probe would switch the head off there)."""
    tolerance = max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, float(want.abs().max()))))


class _StackedLora:
    """Every row of a sampling batch through its own adapter (or none), in two matmuls per layer.

    While active, peft's LoRA layers compute their base output only, and a forward hook on each
    adds the adapters' updates: the rank-r A matrices of all adapters in the batch are stacked
    once per `sample` call, so for x [N, in] the update is
        ((x @ A_all.T) * mask) @ B_all.T,   mask[i, c] = scaling of column c's adapter if it is row i's
    added in place with addmm_. With one adapter the mask is the scaling itself. peft's own
    `adapter_names=` path instead gathers and scatters the rows of each adapter in every layer.
    """

    def __init__(self, lora_layers: list[peft.tuners.lora.LoraLayer], adapters: set[str]):
        self.lora_layers, self.adapters = lora_layers, sorted(adapters)
        self._layers: dict[torch.nn.Module, tuple] = {}
        self._handles: list = []
        self._disabled = None
        self._rows: list[str | None] = []
        self._width = 1
        self._masks: dict[tuple, torch.Tensor | float | None] = {}

    def __enter__(self):
        if not self.lora_layers:
            return self
        self._disabled = _base_only(self.lora_layers)  # every LoRA layer: its base output only
        self._disabled.__enter__()
        for module in self.lora_layers:
            present = [a for a in self.adapters if a in module.lora_A]
            if not present:
                continue
            # In the base weight's dtype, as training's _RunLora computes them (bf16 on a GPU).
            dtype = module.get_base_layer().weight.dtype
            a_all = torch.cat([module.lora_A[a].weight for a in present]).to(dtype)  # [R, in]
            b_all = torch.cat([module.lora_B[a].weight for a in present], dim=1).to(dtype)  # [out, R]
            columns = tuple((a, module.scaling[a], module.lora_A[a].weight.shape[0]) for a in present)
            self._layers[module] = (a_all, b_all.t(), columns)
            self._handles.append(module.register_forward_hook(self._add_updates))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layers.clear()
        if self._disabled is not None:
            return self._disabled.__exit__(*exc)
        return None

    def set_rows(self, adapters: list[str | None], width: int) -> None:
        """The adapter of each row of the next forward pass, whose inputs are `width` tokens long."""
        self._rows, self._width = list(adapters), width
        self._masks.clear()

    def _mask(self, columns: tuple, device, dtype):
        """Per (token) row and stacked column: the column's scaling where it is the row's adapter.
        A float when every row uses the one adapter there is; None when no row uses any."""
        if columns not in self._masks:
            used = {a for a, _, _ in columns} & set(self._rows)
            mask: torch.Tensor | float | None
            if not used:
                mask = None
            elif len(columns) == 1 and set(self._rows) == used:
                mask = float(columns[0][1])
            else:
                mask = torch.tensor(
                    [
                        [scale if row == a else 0.0 for a, scale, rank in columns for _ in range(rank)]
                        for row in self._rows
                    ],
                    dtype=dtype,
                    device=device,
                ).repeat_interleave(self._width, dim=0)
            self._masks[columns] = mask
        return self._masks[columns]

    def _add_updates(self, module, args, output):
        output = output if output.is_contiguous() else output.contiguous()
        self.add_update(module, args[0], output)
        return output

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (contiguous, the base output of `module` for its input x) += the rows' LoRA updates."""
        layer = self._layers.get(module)
        if layer is None:
            return
        a_all, b_all_t, columns = layer
        mask = self._mask(columns, out.device, a_all.dtype)
        if mask is None:
            return
        # Called for every projection of every decode step: no casts or reshapes that are no-ops.
        x = x if x.dim() == 2 else x.reshape(-1, a_all.shape[1])
        out = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        down = torch.mm(x if x.dtype == a_all.dtype else x.to(a_all.dtype), a_all.t())
        if not isinstance(mask, float):
            down.mul_(mask)
        if down.dtype != out.dtype:
            down, b_all_t = down.to(out.dtype), b_all_t.to(out.dtype)
        out.addmm_(down, b_all_t, alpha=mask if isinstance(mask, float) else 1)


class _RunLora:
    """One adapter's LoRA updates for `PlainDecoder`'s whole-sequence forward (training, scoring):
    differentiable, with the adapter's dropout when in train mode. peft computes
    `base(x) + lora_B(lora_A(dropout(x))) * scaling`; this adds the same product into the base
    output in place (one addmm), without the two passes over the [N, out] output that the
    separate scaling and sum take."""

    def __init__(self, lora_layers: list[peft.tuners.lora.LoraLayer], adapter: str):
        # Keyed by the module PlainDecoder passes: each LoraLayer is mixed into an nn.Module.
        self._layers: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, float, torch.nn.Module]] = {
            cast(torch.nn.Module, module): (
                cast(torch.Tensor, module.lora_A[adapter].weight),  # lora_A/B hold nn.Linears
                cast(torch.Tensor, module.lora_B[adapter].weight),
                module.scaling[adapter],
                module.lora_dropout[adapter],
            )
            for module in lora_layers
            if adapter in module.lora_A
        }

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """x [N, in], out [N, out]: PlainDecoder's flattened positions."""
        layer = self._layers.get(module)
        if layer is None:
            return
        a, b, scaling, dropout = layer
        # In the activations' dtype: the float32 adapter is cast (differentiably), not the input, so
        # a bf16 model keeps no float32 copy of each projection's input for the backward pass.
        down = dropout(x) @ (a.t() if a.dtype == x.dtype else a.t().to(x.dtype))
        out.addmm_(down, b.t() if b.dtype == out.dtype else b.t().to(out.dtype), alpha=scaling)


@contextmanager
def _base_only(lora_layers: list[peft.tuners.lora.LoraLayer]):
    """Within: these LoRA layers compute their base output only. peft's `disable_adapter()` does the
    same after a model-status check that walks and prints every module (66-75 ms a call on
    SmolLM2, more than the rest of a small sampling call's overhead), and its per-layer
    `enable_adapters` re-sets every adapter parameter's requires_grad (another 30 ms): this sets the
    layers' flag only, which is what their forward reads."""
    layers = [layer for layer in lora_layers if not layer.disable_adapters]
    direct = all(isinstance(getattr(layer, "_disable_adapters", None), bool) for layer in layers)
    for layer in layers:
        if direct:
            layer._disable_adapters = True
        else:  # a peft that keeps the flag elsewhere: its public toggle
            layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            if direct:
                layer._disable_adapters = False
            else:
                layer.enable_adapters(True)


def verify_checkpoint(directory: Path) -> None:
    """Read every file of a checkpoint (adapter, optimizer state, training state) without
    applying it; raise EngineError naming the broken file. weights_only: never unpickles code."""
    files = [(ADAPTER_WEIGHTS, lambda path: load_file(path))]
    if read_training_state(directory).get("optimizer", True):  # weights-only checkpoints have none
        files.append((OPTIMIZER_STATE, lambda path: torch.load(path, weights_only=True, map_location="cpu")))
    for name, read in files:
        try:
            read(directory / name)
        except Exception as exc:
            raise EngineError(
                f"checkpoint {_ref(directory)} is corrupted or incomplete: {name} cannot be read "
                f"({type(exc).__name__}: {_without_path(exc, directory)})"
            ) from None


def _stamp(directory: Path) -> tuple:
    """Changes whenever the checkpoint is saved over: a save writes new files (new inodes)."""
    return tuple(
        (s.st_ino, s.st_mtime_ns, s.st_size)
        for s in ((directory / TRAINING_STATE).stat(), (directory / ADAPTER_WEIGHTS).stat())
    )


def read_training_state(directory: Path) -> dict:
    try:
        return json.loads((directory / TRAINING_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"checkpoint {_ref(directory)} is not a readable EZTinker checkpoint: "
            f"{TRAINING_STATE}: {_without_path(exc, directory)}"
        ) from exc


def _ref(directory: Path) -> str:
    """A checkpoint directory's reference, '<run_id>/<name>': errors reach clients, who are not
    to learn the server's paths."""
    return f"{directory.parent.name}/{directory.name}"


def _without_path(exc: Exception, directory: Path) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # its filename is the directory's file the message already names
    return str(exc).replace(str(directory), _ref(directory))


def _targets(name: str, target_modules: str | list[str]) -> bool:
    """peft's rule for a list of target module names: the module's name or its last parts
    ('all-linear': every one of the linear layers `_lora_targets` lists)."""
    if target_modules == "all-linear":
        return True
    return any(name == key or name.endswith("." + key) for key in target_modules)


def _lora_targets(model: PreTrainedModel) -> tuple[list[str], list[str]]:
    """Module names of the bare base model: (linear layers LoRA may adapt, every other module).
    The output head is "other": the engine computes logits from its weight directly, and it may
    share that weight with the input embeddings."""
    head = model.get_output_embeddings()
    linear, other = [], []
    for name, module in model.named_modules():
        if not name or ".lora_" in name or ".base_layer" in name or ".lora_dropout" in name:
            continue  # the root, and peft's own submodules once the model is wrapped
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and layer is not head and module is not head:
            linear.append(name)
        else:
            other.append(name)
    return linear, other
