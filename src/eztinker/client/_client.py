"""The Python SDK: `ServiceClient` -> `TrainingClient`, every model call returning an `APIFuture`.

Calls submit at once and return a future, so a recipe can queue `forward_backward` and
`optim_step` back to back and wait only once. Retries live here and only here: 408/429/5xx and
dropped connections are retried with exponential backoff and jitter, and every mutating request
carries an Idempotency-Key reused across its retries, so a retry never applies a step twice.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import httpx
from pydantic import BaseModel

from .._net import is_loopback_url
from ..types import (
    AdamParams,
    CheckpointInfo,
    CreateRunRequest,
    Datum,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    HealthInfo,
    JobInfo,
    JobStatus,
    LoadRequest,
    LoraConfig,
    OptimStepRequest,
    OptimStepResult,
    Prompt,
    RunInfo,
    RunMetrics,
    SampleRequest,
    SampleResult,
    SamplingParams,
    SaveRequest,
    ScoreRequest,
    ScoreResult,
)
from ._custom_loss import CustomLossFn, CustomLossResult, linearise
from ._errors import APIStatusError, ConnectionFailedError, JobFailedError

T = TypeVar("T")
PromptLike = Prompt | str | Sequence[int] | Sequence[dict]
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
_POLL_SECONDS = 30.0


class APIFuture(Generic[T]):
    """A submitted job. `.result(timeout)` blocks until it finishes; `await future` also works."""

    def __init__(self, client: ServiceClient, job_id: str, parse: Callable[[Any], T]):
        self._client, self.job_id, self._parse = client, job_id, parse
        self._info: JobInfo | None = None

    def done(self) -> bool:
        if self._info is None or self._info.status in (JobStatus.pending, JobStatus.running):
            self._info = self._client.job(self.job_id)
        return self._info.status in (JobStatus.completed, JobStatus.failed)

    def result(self, timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._info is None or self._info.status in (JobStatus.pending, JobStatus.running):
            remaining = _POLL_SECONDS if deadline is None else deadline - time.monotonic()
            # Ask the server at least once before giving up, so `result(timeout=0)` (or a timeout
            # spent before the first poll) does not raise TimeoutError for a job that has finished.
            if remaining <= 0 and self._info is not None:
                raise TimeoutError(f"job {self.job_id} did not finish within {timeout} s")
            self._info = self._client.job(self.job_id, wait=max(0.0, min(remaining, _POLL_SECONDS)))
        if self._info.status is JobStatus.failed:
            raise JobFailedError(self.job_id, self._info.kind, self._info.error or "unknown error")
        if self._info.error is not None and self._info.result is None:  # completed; its large result expired since
            raise JobFailedError(self.job_id, self._info.kind, self._info.error)
        return self._parse(self._info.result)

    def __await__(self):
        return asyncio.to_thread(self.result).__await__()

    def __repr__(self) -> str:
        status = self._info.status.value if self._info else "submitted"
        return f"<APIFuture {self.job_id} {status}>"


def to_prompt(prompt: PromptLike) -> Prompt:
    """A prompt from token ids, chat messages, or plain text."""
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(t, int) for t in items):
        return Prompt(tokens=items)
    return Prompt(messages=items)


class ServiceClient:
    """Connection to an `eztinker server`.

    >>> service = ServiceClient("http://127.0.0.1:8000")
    >>> run = service.create_training_run(lora_rank=1)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A URL without a scheme ("localhost:8000") would surface as httpx.UnsupportedProtocol
        # on the first call; say what is wrong, at once.
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https:// (got {base_url!r}), e.g. http://127.0.0.1:8000"
            )
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        # The server gzips large responses (sampled tokens and logprobs) for clients that ask:
        # worth it across a network, a net cost on loopback, where compressing takes longer than
        # sending.
        headers["Accept-Encoding"] = "identity" if is_loopback_url(self.base_url) else "gzip"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout + _POLL_SECONDS, transport=transport
        )
        self._tokenizers: dict[str | None, Any] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- requests
    def request(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        *,
        params: dict | None = None,
        idempotent_key: bool = False,
    ) -> Any:
        """One API call with retries; raises the SDK's exceptions, never httpx's."""
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent_key else {}
        content = body.model_dump_json(exclude_unset=False) if body is not None else None
        if content is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, content=content, params=params, headers=headers)
            except httpx.ConnectError as exc:
                if attempt == self.max_retries:
                    raise ConnectionFailedError(self.base_url, exc) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.TimeoutException) as exc:
                if attempt == self.max_retries:
                    raise ConnectionFailedError(self.base_url, exc) from None
            except httpx.TransportError as exc:
                # Any other transport failure (proxy, protocol) must not leak an httpx exception,
                # per this method's contract; not retried, as a retry cannot help.
                raise ConnectionFailedError(self.base_url, exc) from None
            else:
                if response.status_code < 400:
                    return response.json()
                if (
                    response.status_code not in RETRY_STATUSES
                    or attempt == self.max_retries
                    or response.headers.get("x-should-retry") == "false"
                ):  # e.g. a limit waiting cannot clear
                    raise APIStatusError.from_response(response)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def _submit(self, path: str, body: BaseModel, parse: Callable[[Any], T]) -> APIFuture[T]:
        ref = self.request("POST", path, body, idempotent_key=True)
        return APIFuture(self, ref["job_id"], parse)

    # ---------------------------------------------------------------------------- service
    def health(self) -> HealthInfo:
        return HealthInfo.model_validate(self.request("GET", "/health"))

    def info(self) -> dict:
        return self.request("GET", "/v1/info")

    def job(self, job_id: str, wait: float = 0.0) -> JobInfo:
        return JobInfo.model_validate(self.request("GET", f"/v1/jobs/{job_id}", params={"wait": wait}))

    def list_runs(self) -> list[RunInfo]:
        return [RunInfo.model_validate(r) for r in self.request("GET", "/v1/runs")]

    def create_training_run(
        self,
        *,
        lora_rank: int = 1,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        seed: int = 0,
        base_model: str | None = None,
        from_checkpoint: str | None = None,
        train_unembed: bool = False,
    ) -> TrainingClient:
        request = CreateRunRequest(
            base_model=base_model,
            lora=LoraConfig(
                rank=lora_rank,
                alpha=lora_alpha,
                dropout=lora_dropout,
                target_modules=target_modules,
                train_unembed=train_unembed,
            ),
            seed=seed,
            from_checkpoint=from_checkpoint,
        )
        info = RunInfo.model_validate(self.request("POST", "/v1/runs", request, idempotent_key=True))
        return TrainingClient(self, info.id, info.base_model)

    def training_client(self, run_id: str) -> TrainingClient:
        """A client for an existing run (e.g. after a restart)."""
        info = RunInfo.model_validate(self.request("GET", f"/v1/runs/{run_id}"))
        return TrainingClient(self, run_id, info.base_model)

    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        *,
        base_model: str | None = None,
    ) -> APIFuture[SampleResult]:
        """Sample from a bare base model (no adapter); default: the server's first."""
        request = _sample_request(prompts, num_samples, sampling_params)
        request.base_model = base_model
        return self._submit("/v1/sample", request, SampleResult.model_validate)

    def get_tokenizer(self, cache_dir: Path | None = None, *, base_model: str | None = None):
        """A base model's tokenizer (default: the server's first; fetched once, cached on disk),
        for building examples."""
        if base_model not in self._tokenizers:
            from transformers import AutoTokenizer

            params = {"model": base_model} if base_model is not None else None
            payload = self.request("GET", "/v1/tokenizer", params=params)
            key = uuid.uuid5(uuid.NAMESPACE_URL, self.base_url + payload["model"]).hex[:12]
            target = (cache_dir or Path.home() / ".cache" / "eztinker" / "tokenizers") / key
            target.mkdir(parents=True, exist_ok=True)
            for name, text in payload["files"].items():
                (target / Path(name).name).write_text(text)
            self._tokenizers[base_model] = AutoTokenizer.from_pretrained(target)
        return self._tokenizers[base_model]


class TrainingClient:
    """One training run: its LoRA adapter and optimizer state on the server."""

    def __init__(self, service: ServiceClient, run_id: str, base_model: str | None = None):
        self.service, self.run_id = service, run_id
        self._base_model = base_model

    def __repr__(self) -> str:
        return f"<TrainingClient {self.run_id}>"

    def _path(self, verb: str) -> str:
        return f"/v1/runs/{self.run_id}/{verb}"

    def info(self) -> RunInfo:
        return RunInfo.model_validate(self.service.request("GET", f"/v1/runs/{self.run_id}"))

    def delete(self) -> None:
        self.service.request("DELETE", f"/v1/runs/{self.run_id}")

    def metrics(self) -> RunMetrics:
        """The run's training curve as the server recorded it: one point per optimizer step."""
        return RunMetrics.model_validate(self.service.request("GET", self._path("metrics")))

    def get_tokenizer(self):
        """The tokenizer of this run's base model."""
        if self._base_model is None:
            self._base_model = self.info().base_model
        return self.service.get_tokenizer(base_model=self._base_model)

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy"
    ) -> APIFuture[ForwardBackwardResult]:
        request = ForwardBackwardRequest(data=list(data), loss_fn=loss_fn)
        return self.service._submit(self._path("forward_backward"), request, ForwardBackwardResult.model_validate)

    def forward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy") -> APIFuture[ForwardBackwardResult]:
        """The loss and every target token's logprob under the run's adapter; no gradient."""
        request = ForwardBackwardRequest(data=list(data), loss_fn=loss_fn)
        return self.service._submit(self._path("forward"), request, ForwardBackwardResult.model_validate)

    def forward_backward_custom(self, data: Sequence[Datum], loss_fn: CustomLossFn) -> APIFuture[CustomLossResult]:
        """Accumulate the gradient of `loss_fn(data, logprobs) -> (loss, metrics)`, any torch-
        differentiable function of the per-token logprobs (one 1-D tensor per datum), as the
        Tinker SDK's call does: a `forward`, the loss and its gradient here, then a
        `forward_backward` whose cross_entropy weights are minus that gradient.

        Waits for the forward (its logprobs are the loss's input) and returns once the
        forward_backward is submitted, so calls submitted after it (an `optim_step`) queue behind it.
        """
        data = list(data)
        if any(datum.loss_fn_inputs.targets_per_position is not None for datum in data):
            raise ValueError("forward_backward_custom takes [N] target_tokens, not [N, K]")
        forward = self.forward(data).result()
        rows = cast(list[list[float | None]], forward.logprobs)  # [N] targets: one logprob a position
        loss, metrics, weighted = linearise(data, rows, loss_fn)
        logprobs = [[float(v) for v in row if v is not None] for row in rows]  # linearise refused None

        def parse(raw: Any) -> CustomLossResult:
            result = ForwardBackwardResult.model_validate(raw)
            return CustomLossResult(loss=loss, metrics=metrics, logprobs=logprobs, num_tokens=result.num_tokens)

        request = ForwardBackwardRequest(data=weighted, loss_fn="cross_entropy")
        return self.service._submit(self._path("forward_backward"), request, parse)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResult]:
        request = OptimStepRequest(adam_params=adam_params or AdamParams())
        return self.service._submit(self._path("optim_step"), request, OptimStepResult.model_validate)

    def sample(
        self, prompts: Sequence[PromptLike], num_samples: int = 1, sampling_params: SamplingParams | None = None
    ) -> APIFuture[SampleResult]:
        """Candidates from the run's current adapter."""
        request = _sample_request(prompts, num_samples, sampling_params)
        return self.service._submit(self._path("sample"), request, SampleResult.model_validate)

    def score(self, prompt: PromptLike, responses: Sequence[str]) -> APIFuture[ScoreResult]:
        request = ScoreRequest(prompt=to_prompt(prompt), responses=list(responses))
        return self.service._submit(self._path("evaluate"), request, ScoreResult.model_validate)

    def save_state(self, name: str) -> APIFuture[CheckpointInfo]:
        return self.service._submit(self._path("save"), SaveRequest(name=name), CheckpointInfo.model_validate)

    def load_state(self, checkpoint: str) -> APIFuture[dict]:
        """Load '<name>' of this run or '<run_id>/<name>': adapter, optimizer state and step."""
        return self.service._submit(self._path("load"), LoadRequest(checkpoint=checkpoint), lambda r: r)


def _sample_request(prompts: Sequence[PromptLike], num_samples: int, params: SamplingParams | None) -> SampleRequest:
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    return SampleRequest(
        prompts=[to_prompt(p) for p in prompts], num_samples=num_samples, sampling_params=params or SamplingParams()
    )


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: 0.25 s, 0.5 s, 1 s, ... capped at 8 s."""
    return random.uniform(0, min(8.0, 0.25 * 2**attempt))
