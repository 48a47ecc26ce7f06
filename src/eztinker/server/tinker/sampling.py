"""`TinkerServing`'s sampling: sampling sessions (of a base model or a checkpoint) and their
samples, which stop decoding once their client session has ended."""

from __future__ import annotations

from pydantic import ValidationError

from ...backend.results import JobKind
from ...types import JobRef, SamplingParams
from ..service import LimitExceeded, ServiceError
from . import protocol as p
from . import wire
from .core import TinkerCore
from .futures import FutureExtra, FutureRef
from .provenance import session_of_id


class SamplingPart(TinkerCore):
    """Sampling sessions and their samples."""

    def create_sampling_session(self, user: str, body: p.CreateSamplingSession) -> str:
        self.session_of(user, body.session_id)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path is not None:
            try:
                run_id, name = p.parse_tinker_path(body.model_path)
            except ValueError as exc:
                raise ServiceError(422, str(exc), ("model_path",)) from None
            self.service.checkpoint_path(user, f"{run_id}/{name}", field="model_path", published=True)  # else 404
            base_model = self.service.run_record(run_id).base_model
            self.service.add_sampler(user, sampler_id, base_model, f"{run_id}/{name}", body.model_path)
        elif body.base_model is not None:
            self.service.add_sampler(user, sampler_id, self.service.model(body.base_model), None, None)
        else:
            raise ServiceError(422, "give model_path or base_model", ("model_path",))
        return sampler_id

    def sampler(self, user: str, sampler_id: str) -> dict:
        sampler = self.service.sampler(user, sampler_id)
        if sampler is None:
            raise ServiceError(404, f"sampler {sampler_id} not found")
        return {"sampler_id": sampler.id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    def sample(self, user: str, body: p.ASample, key: str | None) -> FutureRef:
        try:
            ref = self._submit_sample(user, body, key)
        except (ServiceError, ValidationError, wire.WireError) as exc:
            if isinstance(exc, LimitExceeded) and exc.clears:
                raise  # a 429: the SDK's sampling backpressure waits a second and sends it again
            failed = self._refused(user, JobKind.sample, None, exc)
            # The SDK wants an id per sample even for a request that fails (it then reads none of them);
            # no more than the server could ever sample, whatever num_samples claims.
            count = min(body.num_samples, self.service.settings.max_samples_per_request)
            return FutureRef(failed.request_id, sample_sequence_ids=[f"{failed.request_id}:{i}" for i in range(count)])
        return FutureRef(ref.job_id, sample_sequence_ids=[f"{ref.job_id}:{i}" for i in range(body.num_samples)])

    def _submit_sample(self, user: str, body: p.ASample, key: str | None) -> JobRef:
        refusal = body.unsupported()
        if refusal is not None:
            raise ServiceError(422, refusal)
        sampler = self.service.sampler(user, body.sampling_session_id)
        if sampler is None:
            raise ServiceError(404, f"sampling session {body.sampling_session_id} not found")
        prompt = wire.decode_model_input_json(body.prompt)
        grid = None if body.target_prompt_logprobs is None else wire.decode_target_grid(body.target_prompt_logprobs)
        stop, stop_ids = wire.parse_stop(body.sampling_params.stop)
        sp = body.sampling_params
        params = SamplingParams(
            max_tokens=sp.max_tokens or min(self.service.settings.max_new_tokens, 256),
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=max(sp.top_k, 0),
            stop=stop,
            stop_token_ids=stop_ids,
            seed=sp.seed,
            ignore_eos=wire.stop_disables_eos(sp.stop),
        )
        snapshot = None
        if sampler.checkpoint is not None:
            snapshot, _ = self.service.checkpoint_path(
                user, sampler.checkpoint, field="sampling_session_id", published=True
            )
        session_id = self._live_session_of_sampler(user, body.sampling_session_id)
        ref = self.service.submit_sample_tokens(
            user,
            sampler.base_model,
            None,
            [prompt],
            body.num_samples,
            params,
            body,
            key,
            snapshot=snapshot,
            prompt_logprobs=bool(body.prompt_logprobs) or body.topk_prompt_logprobs > 0,
            topk_prompt_logprobs=body.topk_prompt_logprobs,
            topk_logprobs=body.topk_sample_logprobs,
            prompt_logprobs_last_n=body.prompt_logprobs_last_n,
            prompt_targets=None if grid is None else [grid.rows],
            prompt_alt_tokens_k=body.prompt_alt_tokens_k,
            consumers_gone=lambda: self.liveness.ended(session_id),
        )
        # record_stability_info: the sequences are recorded when the answer is first read (_answer).
        stability = session_of_id(body.sampling_session_id) if body.record_stability_info else None
        if grid is not None or stability is not None:
            self.extras.remember(
                ref.job_id,
                FutureExtra(target_grid=grid, stability_session=stability, prompt=tuple(prompt) if stability else ()),
            )
        return ref

    def _live_session_of_sampler(self, user: str, sampler_id: str) -> str:
        """The client session a sampler belongs to (its futures' only reader), known to the liveness
        record; a sample for a session that has ended is refused."""
        session_id = sampler_id.rsplit(":sample:", 1)[0]
        if session_id not in self.liveness:  # e.g. after a restart
            session = self.service.session(user, session_id)
            if session is not None:
                self.liveness.beat(session_id, session.heartbeat_at)
                if session.finished_at is not None:
                    self.liveness.finish(session_id)
        if self.liveness.ended(session_id):
            raise ServiceError(410, f"session {session_id} has ended; create a new ServiceClient")
        return session_id
