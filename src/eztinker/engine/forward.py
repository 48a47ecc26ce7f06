"""The forward path: from token ids to hidden states, logprobs and sampled tokens, by the fastest
way that computes this model and these adapters exactly.

`PlainDecoder` (plain tensor ops, base weights packed for oneDNN where that measured faster) where
it covers the model and the adapters are plain LoRA, else transformers' and peft's modules; the
output projection in chunks by the head's weight where the head is a plain linear layer (checked
once against the model's own logits), else through the head module. What can be chosen once is
chosen once per change of adapters (`Adapters.version`), not per call.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext

import torch

from ..types import SampledSequence
from . import losses, output_projection, packed_linear, plain_decoder, prompt_attention
from .adapters import Adapters
from .head_lora import HeadLora, HeadLoraProjection
from .head_lora import features as head_features
from .lora_forward import RunLora, StackedLora, base_only
from .models import BaseModel
from .sampler import OutputHead, SampleSpec, sample

_PEFT_BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
# Config fields of models whose forward rescales or caps the logits after the output projection.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ForwardPath:
    def __init__(
        self,
        base: BaseModel,
        adapters: Adapters,
        *,
        logits_chunk: int,
        pack_weights: bool,
        activation_checkpointing: bool | None,
    ):
        """activation_checkpointing (None: on where it pays, on an accelerator, whose memory bounds
        the micro-batch; on the CPU it would only cost time)."""
        self.base = base
        self.adapters = adapters
        self.logits_chunk = logits_chunk  # positions per output-projection chunk
        self._head: OutputHead | None = None
        self._head_checked = False
        self._plain: plain_decoder.PlainDecoder | None = None
        self._plain_version: int | None = None  # the adapters' version `_plain` was built for
        # Base weights packed for oneDNN (packed_linear.py), by id of the weight (kept alive beside).
        self.pack_weights = pack_weights
        self._packs: dict[int, tuple[torch.Tensor, packed_linear.PackedWeight | None]] = {}
        if activation_checkpointing is None:
            activation_checkpointing = base.device.type != "cpu"
        # Only PlainDecoder's forward checkpoints (transformers' layers do so in train mode only).
        self.activation_checkpointing = activation_checkpointing and plain_decoder.supports(
            self.decoder(), base.model.config
        )

    def warm_up(self) -> None:
        """Pack (and time, packed_linear.py) the base weights now, rather than in the first call."""
        self.plain_decoder()
        self.output_head()

    def close(self) -> None:
        self._packs.clear()  # the packed copies of the base weights: the weights' memory again

    def decoder(self) -> torch.nn.Module:
        model = self.base.model
        return getattr(model, model.base_model_prefix)

    def right_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.base.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return input_ids.to(self.base.device), attention_mask.to(self.base.device)

    # ---------------------------------------------------------------- whole sequences
    def hidden_states(self, adapter: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, T, H] of right-padded sequences through `adapter` (a run's
        or a snapshot's LoRA, None: the bare model): by `PlainDecoder` where it computes this model
        and adapter, else through transformers' and peft's modules."""
        plain = self.plain_decoder()
        if plain is not None and (adapter is None or self.adapters.plain_lora({adapter})):
            lora = None if adapter is None else RunLora(self.adapters.lora_layers(), adapter)
            return plain.causal(input_ids, lora, self.activation_checkpointing)
        with self.adapters.through(adapter):
            return self.decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def plain_decoder(self) -> plain_decoder.PlainDecoder | None:
        """The decoder as plain tensor ops, where `PlainDecoder` computes this model (else None);
        built once per change of adapters (the first adapter wraps every projection in peft's
        LoRA layer), since checking and collecting every layer's parameters is not free."""
        if self._plain_version != self.adapters.version:
            decoder, config = self.decoder(), self.base.model.config
            supported = plain_decoder.supports(decoder, config)
            self._plain = plain_decoder.PlainDecoder(decoder, config, self._packed) if supported else None
            self._plain_version = self.adapters.version
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

    # ----------------------------------------------------------------------- the head
    def output_head(self) -> OutputHead | None:
        """The model's output projection when the sampler may apply it to the final hidden state
        itself (a plain linear layer, checked once against the model's own logits); else None."""
        if self._head_checked:
            return self._head
        self._head_checked = True
        linear = self.adapters.head_linear()
        config = self.base.model.config
        if type(linear) is not torch.nn.Linear or any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING
        ):
            return None
        head = OutputHead(linear.weight, linear.bias, self._packed(linear.weight, head=True))
        probe = torch.tensor([[self.base.pad_token_id, min(1, self.base.vocab_size - 1)]], device=self.base.device)
        with torch.no_grad(), self.adapters.bare():
            want = self.base.model(input_ids=probe, logits_to_keep=1).logits[:, -1].float()
            hidden = self.decoder()(input_ids=probe).last_hidden_state[:, -1]
            got = head.logits(hidden, torch.empty_like(want))
        if head_matches(got, want, linear.weight.dtype):
            self._head = head
        return self._head

    def projection(self, head_lora: HeadLora | None = None) -> losses.VocabProjection | None:
        """The fast output projection (None where the head is not a plain linear one); with `head_lora`,
        it projects `head_lora.features(hidden, head_lora)` (head_lora.py)."""
        head = self.output_head()
        if head is None:
            return None
        if head_lora is not None:
            return HeadLoraProjection(head.weight, head.bias, self.logits_chunk, head.packed, head_lora)
        return losses.VocabProjection(head.weight, head.bias, self.logits_chunk, head.packed)

    def target_logprobs(
        self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, head_lora: HeadLora | None = None
    ) -> torch.Tensor:
        """The targets' logprobs through the head module, in the autograd graph."""
        logits = self.adapters.head_linear()(hidden_N_H).float()
        if head_lora is not None:
            logits = head_lora.logits(logits, hidden_N_H)
        return torch.log_softmax(logits, dim=-1).gather(-1, losses.two_d(targets_N)).reshape(targets_N.shape)

    @torch.no_grad()
    def logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, topk: int = 0, *, adapter: str | None):
        """Target logprobs [N], the k largest logprobs [N, k] and their token ids [N, k], no graph, under
        `adapter`'s LoRA on the output head if it has one (its LoRAs elsewhere made the hidden states)."""
        head_lora = self.adapters.head_lora(adapter)
        projection = self.projection(head_lora)
        if projection is not None:
            features = hidden_N_H if head_lora is None else head_features(hidden_N_H, head_lora)
            return projection.logprobs(features, targets_N, topk)
        n, device = hidden_N_H.shape[0], hidden_N_H.device
        logprobs_N = torch.empty(targets_N.shape, device=device)
        top_N_K = torch.empty(n, topk, device=device)
        ids_N_K = torch.empty(n, topk, dtype=torch.long, device=device)
        head = self.adapters.head_linear()
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

    def log_softmax(self, hidden_C_H: torch.Tensor, *, adapter: str | None) -> torch.Tensor:
        """The model's logprobs (temperature 1) over the vocabulary [C, V] at these final hidden states,
        `adapter`'s LoRA on the output head included if it has one."""
        logits = self.adapters.head_linear()(hidden_C_H).float()
        head_lora = self.adapters.head_lora(adapter)
        if head_lora is not None:
            logits = head_lora.logits(logits, hidden_C_H)
        return torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, specs: list[SampleSpec]) -> list[list[list[SampledSequence]]]:
        """Candidates for many requests, of one or several adapters (or the base model), in one
        batch: by the sampler's own head and `StackedLora` where they reproduce the model, else
        through the whole model."""
        head = self.output_head()
        adapters = {spec.adapter for spec in specs if spec.adapter is not None}
        stacked = self._stacked_lora(adapters) if head is not None else None
        head_loras = {a: lora for a in adapters if (lora := self.adapters.head_lora(a)) is not None}
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

    def _stacked_lora(self, adapters: set[str]) -> StackedLora | None:
        """The fast sampling path's LoRA, when it reproduces peft's (no dropout: sampling is in eval mode)."""
        if self.adapters.peft is None:
            return StackedLora([], set())
        if not self.adapters.plain_lora(adapters):
            return None
        # The head's LoRA is the sampler's to add (OutputHead.loras): the model's head is never called here.
        head = self.adapters.head_lora_layer()
        return StackedLora([layer for layer in self.adapters.lora_layers() if layer is not head], adapters)

    def _features_fn(self, stacked: StackedLora):
        """Forward to the final hidden state of the last position; the sampler projects it itself.
        The prefill and decode steps of the models it covers go through `PlainDecoder`."""
        plain = self.plain_decoder()

        def forward(input_ids, attention_mask, position_ids, cache, adapters):
            stacked.set_rows(adapters, input_ids.shape[1])
            if plain is not None:  # one token a row: a decode step (or one-token prompts' prefill); wider: a prefill
                step = plain.decode if input_ids.shape[1] == 1 else plain.prefill
                return step(input_ids, attention_mask, position_ids, cache, stacked)
            with self._attention_for(cache):
                hidden = self.decoder()(
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
            model = self.adapters.peft
            if model is None:
                return self.base.model(**kwargs).logits[:, -1]
            if distinct == {None}:
                with base_only(self.adapters.lora_layers()):
                    return model(**kwargs).logits[:, -1]
            if len(distinct) == 1:
                self.adapters.activate(adapters[0])
                return model(**kwargs).logits[:, -1]
            names = [_PEFT_BASE_ROW if a is None else a for a in adapters]
            return model(**kwargs, adapter_names=names).logits[:, -1]

        return forward

    def _attention_for(self, cache) -> AbstractContextManager:
        """Decode steps over a SharedPromptCache read it through its own attention."""
        if isinstance(cache, prompt_attention.SharedPromptCache):
            return prompt_attention.attending(cache, self.base.model.config)
        return nullcontext()


def head_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the head's logits `got` are the model's `want` to the rounding of `dtype`: 1e-4 in
    float32; a few units in the last place of bf16's 8-bit mantissa (2^-7 = 0.8%) in bf16, whose
    logits two orders of summation may round apart (a 1e-4 probe would switch the head off there)."""
    tolerance = max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, float(want.abs().max()))))
