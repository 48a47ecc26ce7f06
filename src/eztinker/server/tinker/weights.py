"""`TinkerServing`'s save and load: a model's weights saved for training, for a sampler or as a
PEFT folder, and loaded into a model (or a new one, create_training_client_from_state)."""

from __future__ import annotations

from pydantic import ValidationError

from ...backend.results import JobKind
from ...types import CreateRunRequest, JobRef, LoadRequest, SaveRequest
from ..checkpoints import CheckpointKind
from ..downloads import check_age_recipients
from ..service import ServiceError
from . import protocol as p
from .core import TinkerCore, model_id_of
from .futures import FutureExtra, FutureRef


class WeightsPart(TinkerCore):
    """Saving a model's weights (for training, for a sampler, as a PEFT folder) and loading them."""

    async def save_weights(self, user: str, body: p.SaveWeights, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                ref = self.service.submit_save(
                    user,
                    body.model_id,
                    SaveRequest(name=body.path),
                    key,
                    kind=CheckpointKind.training,
                    field="path",
                    ttl_seconds=body.ttl_seconds,
                    overwrite=body.overwrite,
                    meta={"user_metadata": body.user_metadata},
                )
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    async def save_weights_for_sampler(self, user: str, body: p.SaveWeightsForSampler, key: str | None) -> FutureRef:
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                if body.path is not None:
                    ref = self.service.submit_save(
                        user,
                        body.model_id,
                        SaveRequest(name=body.path),
                        key,
                        kind=CheckpointKind.sampler,
                        field="path",
                        ttl_seconds=body.ttl_seconds,
                        meta={"user_metadata": body.user_metadata},
                    )
                else:
                    ref = self._save_session_snapshot(user, body, key)
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    def _save_session_snapshot(self, user: str, body: p.SaveWeightsForSampler, key: str | None) -> JobRef:
        """An unnamed snapshot for a sampling session of the current weights: saved like a named
        one, so that it stays what it is however the run trains on. The service prunes the run's
        older ones (never a named checkpoint)."""
        if body.sampling_session_seq_id is None:
            raise ServiceError(422, "give path or sampling_session_seq_id", ("path",))
        session_id = body.model_id.split(":train:")[0]
        sampler_id = f"{session_id}:sample:{body.sampling_session_seq_id}"
        ref, checkpoint = self.service.submit_sampler_snapshot(
            user, body.model_id, sampler_id, key, ttl_seconds=body.ttl_seconds
        )
        run = self.service.get_run(user, body.model_id)
        self.service.add_sampler(user, sampler_id, run.base_model, checkpoint, None)
        self.extras.remember(ref.job_id, FutureExtra(sampling_session_id=sampler_id))
        return ref

    async def save_weights_external(self, user: str, body: p.SaveWeightsExternal, key: str | None) -> FutureRef:
        """The adapter as a PEFT folder, downloadable through external_weights_urls (its files
        encrypted to `age_encryption_recipients` as they go out, when given)."""
        if (refused := self._not_owned(user, JobKind.save, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                recipients = body.age_encryption_recipients
                meta = {"age_recipients": check_age_recipients(recipients)} if recipients is not None else {}
                ref = self.service.submit_save(
                    user,
                    body.model_id,
                    SaveRequest(name=body.path),
                    key,
                    field="path",
                    kind=CheckpointKind.external,
                    ttl_seconds=body.ttl_seconds,
                    meta=meta,
                )
            except (ServiceError, ValidationError) as exc:
                return self._refused(user, JobKind.save, body.model_id, exc)
        return FutureRef(ref.job_id, model_id=body.model_id)

    async def load_weights(self, user: str, body: p.LoadWeights, key: str | None) -> FutureRef:
        if body.weights_access_token is not None:
            raise ServiceError(
                422,
                "weights_access_token is not supported by this server: the checkpoint's owner "
                "publishes it instead (RestClient.publish_checkpoint_from_tinker_path)",
                ("weights_access_token",),
            )
        if body.model_id is None:
            return self._create_from_state(user, body, key)
        if (refused := self._not_owned(user, JobKind.load, body.model_id)) is not None:
            return refused
        async with self.sequencer.turn(body.model_id, body.seq_id):
            try:
                p.check_optimizer_config(body.optimizer_config)
                source, name = p.parse_tinker_path(body.path)
                ref = self.service.submit_load(
                    user, body.model_id, LoadRequest(checkpoint=f"{source}/{name}"), key, with_optimizer=body.optimizer
                )
            except (ServiceError, ValidationError, ValueError) as exc:
                return self._refused(user, JobKind.load, body.model_id, exc)
        self.extras.remember(ref.job_id, FutureExtra(path=body.path, model_id=body.model_id))
        return FutureRef(ref.job_id, model_id=body.model_id)

    def _create_from_state(self, user: str, body: p.LoadWeights, key: str | None) -> FutureRef:
        """create_training_client_from_state: a new model from the checkpoint."""
        if body.session_id is None or body.model_seq_id is None:
            raise ServiceError(422, "give model_id, or session_id and model_seq_id", ("model_id",))
        model_id = model_id_of(body.session_id, body.model_seq_id)
        try:
            self.session_of(user, body.session_id)
            p.check_optimizer_config(body.optimizer_config)
            source, name = p.parse_tinker_path(body.path)
            request = CreateRunRequest(base_model=body.base_model, from_checkpoint=f"{source}/{name}")
            ref = self.service.submit_create_run(
                user,
                request,
                key,
                run_id=model_id,
                with_optimizer=body.optimizer,
                metadata={"user_metadata": body.user_metadata or {}},
            )
        except (ServiceError, ValidationError, ValueError) as exc:
            return self._refused(user, JobKind.create_run, None, exc)
        self.sequencer.start(model_id)
        self.extras.remember(ref.job_id, FutureExtra(path=body.path, model_id=model_id))
        return FutureRef(ref.job_id, model_id=model_id)
