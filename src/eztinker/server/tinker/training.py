"""`TinkerServing`'s training: a model is created, then trained by forward_backward and optim_step,
each in its model's seq_id order (`Sequencer`)."""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from ...backend.results import JobKind
from ...types import LOSS_FNS, CreateRunRequest, ForwardBackwardRequest, LoraConfig, OptimStepRequest
from ..service import ServiceError
from . import protocol as p
from . import wire
from .core import ATTN_MODULES, MLP_MODULES, TinkerCore, model_id_of
from .futures import FutureRef
from .provenance import ProvenanceError, resolve, session_of_id


class TrainingPart(TinkerCore):
    """Training models: created, then trained by forward_backward and optim_step in seq_id order."""

    def create_model(self, user: str, body: p.CreateModel, key: str | None) -> FutureRef:
        model_id = model_id_of(body.session_id, body.model_seq_id)
        try:
            self.session_of(user, body.session_id)
            p.check_optimizer_config(body.optimizer_config)
            lora = body.lora_config
            if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
                raise ServiceError(422, "train_attn, train_mlp or train_unembed must be true", ("lora_config",))
            targets = (
                "all-linear"
                if lora.train_attn and lora.train_mlp
                else (ATTN_MODULES if lora.train_attn else MLP_MODULES if lora.train_mlp else [])
            )
            request = CreateRunRequest(
                base_model=body.base_model,
                seed=lora.seed or 0,
                lora=LoraConfig(rank=lora.rank, alpha=32.0, target_modules=targets, train_unembed=lora.train_unembed),
            )
            metadata = {"user_metadata": body.user_metadata or {}, "lora_config": lora.model_dump()}
            ref = self.service.submit_create_run(user, request, key, run_id=model_id, metadata=metadata)
        except (ServiceError, ValidationError, ValueError) as exc:
            return self._refused(user, JobKind.create_run, None, exc)
        self.sequencer.start(model_id)
        return FutureRef(ref.job_id, model_id=model_id)

    def model_info(self, user: str, model_id: str) -> dict:
        run = self.service.get_run(user, model_id)
        info = self.service.models.get(run.base_model)
        return {
            "model_id": run.id,
            "model_data": {
                "arch": info.architecture if info else None,
                "model_name": run.base_model,
                "tokenizer_id": info.tokenizer_id if info else run.base_model,
            },
            "optimizer_config": p.ADAMW,
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "model_name": run.base_model,
        }

    # ------------------------------------------------------------------ training
    async def forward_backward(self, user: str, raw: bytes, encoding: str | None, key: str | None) -> FutureRef:
        settings = self.service.settings
        # Off the event loop: inflating and decoding take time that grows with the body.
        call = await run_in_threadpool(
            wire.decode_forward_backward,
            raw,
            encoding,
            max_decompressed_bytes=settings.max_request_bytes,
            max_elements=settings.max_tokens_per_request,
        )
        if (refused := self._not_owned(user, JobKind.forward_backward, call.model_id)) is not None:
            return refused
        async with self.sequencer.turn(call.model_id, call.seq_id):
            # Off the event loop too: checking every token and hashing the request grow with the body.
            return await run_in_threadpool(self._submit_forward_backward, user, call, key)

    def _submit_forward_backward(self, user: str, call: wire.ForwardBackwardCall, key: str | None) -> FutureRef:
        """Validate a decoded forward_backward and queue its job (a worker thread, in its turn)."""
        try:
            if call.loss_fn not in LOSS_FNS:
                raise ServiceError(
                    422,
                    f"loss_fn {call.loss_fn!r} is not supported by this server; it supports {', '.join(LOSS_FNS)}",
                    ("loss_fn",),
                )
            data = self._with_recorded_logprobs(call) if call.loss_fn == "stable_reinforce" else call.data
            request = ForwardBackwardRequest(
                data=data, loss_fn=call.loss_fn, loss_fn_config=call.loss_fn_config or None
            )
            ref = self.service.submit_forward_backward(
                user, call.model_id, request, key, forward_only=call.forward_only, all_logprobs=True
            )
        except (ServiceError, ValidationError) as exc:
            return self._refused(user, JobKind.forward_backward, call.model_id, exc)
        return FutureRef(ref.job_id, model_id=call.model_id)

    def _with_recorded_logprobs(self, call: wire.ForwardBackwardCall) -> list:
        """stable_reinforce's data with the sampler's recorded logprobs in `logprobs` wherever a
        run of sampled tokens covers a target; 422 naming the datum when its provenance is
        missing or does not match the record."""
        session_id = session_of_id(call.model_id)
        data = []
        for i, (datum, provenance) in enumerate(zip(call.data, call.provenance)):
            if provenance is None:
                raise ServiceError(
                    422,
                    f"data[{i}] has no provenance: stable_reinforce needs every datum to name the "
                    "sampled sequences behind its tokens (Datum.with_provenance)",
                    ("data", i, "loss_fn_input_spans"),
                )
            inputs = datum.loss_fn_inputs
            if inputs.targets_per_position is not None:
                raise ServiceError(
                    422,
                    f"data[{i}].loss_fn_inputs.target_tokens is [N, K]; stable_reinforce takes [N]",
                    ("data", i, "loss_fn_inputs", "target_tokens"),
                )
            try:
                recorded = resolve(
                    self.stability, session_id, i, provenance, datum.model_input.tokens, inputs.flat_target_tokens()
                )
            except ProvenanceError as exc:
                raise ServiceError(422, exc.message, exc.loc) from None
            if inputs.logprobs is None:
                data.append(datum)  # refused by name when the request is built
                continue
            logprobs = [sent if mine is None else mine for sent, mine in zip(inputs.logprobs, recorded)]
            data.append(datum.model_copy(update={"loss_fn_inputs": inputs.model_copy(update={"logprobs": logprobs})}))
        return data

    async def optim_step(self, user: str, body: p.OptimStep, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.optim_step, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                request = OptimStepRequest(adam_params=body.adam())
                ref = self.service.submit_optim_step(user, body.model_id, request, key)
            except (ServiceError, ValidationError, ValueError) as exc:
                return self._refused(user, JobKind.optim_step, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)
