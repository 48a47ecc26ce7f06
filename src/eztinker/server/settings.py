"""The server's one settings model: every field described, unknown keys rejected.

Values come from CLI flags (generated from these fields), then a settings file (`--settings-file`,
JSON or TOML, the same keys), then `EZTINKER_*` environment variables, then the defaults below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .._net import is_loopback_host
from ..model_spec import served_name
from .limits import UserLimits
from .retention import RetentionPolicy


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EZTINKER_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; anything but loopback needs an API key.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="Base model, repeatable (the first is the default for new runs): a Hub id, a local "
        "directory, 'smollm2-135m' (embedded, offline) or 'auto' (Qwen/Qwen2-0.5B-Instruct when the Hub "
        "is reachable, else smollm2-135m); NAME=SOURCE serves SOURCE under the name NAME (e.g. "
        "Qwen/Qwen3-4B-Instruct-2507=/path/to/folder, for recipes that look models up by name). In a "
        "settings file also a table {NAME = SOURCE, ...}.",
    )
    data_dir: Path = Field(Path("data"), description="Database, checkpoints and model cache live here.")
    checkpoint_dir: Path | None = Field(
        None,
        description="Where checkpoints (and the snapshots runs restore from) live, if not <data-dir>/checkpoints: "
        "with --backend ray, a folder every Ray node reads and writes at this same path (a shared file system).",
    )
    device: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Device of the base models, repeatable: 'cpu', 'cuda' or 'cuda:N' for every model, one per "
        "--model in order, or MODEL=DEVICE for one. Default (and 'cuda' without an index): the models spread over "
        "the visible GPUs, the CPU without one. With --backend ray: one device, each worker's own.",
    )
    microbatch_tokens: int | None = Field(
        None,
        ge=64,
        description="Padded tokens per training forward pass (a micro-batch); default: sized from the "
        "device's free memory once the model is loaded (on the CPU the host's, at most 8192).",
    )
    activation_checkpointing: bool | None = Field(
        None,
        description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(less memory, about a third more compute); default: on a GPU, off on the CPU.",
    )
    backend: Literal["local", "ray"] = Field(
        "local",
        description="'local': the engines run in this process; 'ray': in Ray actors, on any node of a Ray cluster.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'HOST:PORT' or 'ray://HOST:PORT'); default: start a "
        "single-machine Ray instance. Needs --backend ray.",
    )
    workers_per_model: list[int] = Field(
        default_factory=lambda: [1],
        description="Ray workers (engine actors) per base model: one number for every "
        "--model, or one per --model in order. Needs --backend ray.",
    )
    worker_cpus: float = Field(1, gt=0, description="CPUs each Ray worker reserves (its torch threads).")
    worker_gpus: float | None = Field(
        None, ge=0, description="GPUs each Ray worker reserves; default: 1 when the cluster has GPUs, else 0."
    )
    api_key: SecretStr | None = Field(None, description="Single API key (user 'default').")
    api_keys_file: Path | None = Field(
        None, description="JSON file mapping API keys to user names; each user sees only their runs."
    )
    max_new_tokens: int = Field(1024, ge=1, description="Upper bound on sampling_params.max_tokens.")
    max_prompt_tokens: int = Field(4096, ge=1, description="Longest prompt or training example, in tokens.")
    max_batch_examples: int = Field(1024, ge=1, description="Most datums in one forward_backward.")
    max_samples_per_request: int = Field(
        4096, ge=1, description="Most candidates (prompts x num_samples) in one sample request."
    )
    max_tokens_per_request: int = Field(
        256 * 1024,
        ge=1,
        description="Most tokens one job may make the model hold (its memory bound): forward_backward's "
        "datums together; evaluate's prompt + response, summed over responses; sample's (prompt + max_tokens) x "
        "num_samples, summed over prompts.",
    )
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    header_timeout_seconds: float = Field(
        10,
        gt=0,
        description="A request's headers must arrive within this many seconds of the connection opening "
        "(or of its previous response), else a 408 and the connection is closed (slow clients).",
    )
    body_timeout_seconds: float = Field(
        120,
        gt=0,
        description="A request's body must arrive within this many seconds of its headers "
        "(max_request_bytes at 1 MB/s fits), else a 408 and the connection is closed.",
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Most connections served at once; a request beyond gets 503 (the SDKs retry). "
        "Each connection is a file descriptor.",
    )
    sample_gather_ms: float = Field(
        50,
        ge=0,
        le=1000,
        description="A sample job waits for more samples of its model until none has arrived for "
        "this many milliseconds (10 times this at most), so that requests sent together decode as one batch "
        "(the Tinker SDK sends one request per prompt; 16 sent at once arrived up to 37 ms apart on a 2-core "
        "machine); 0 starts every sample at once.",
    )
    job_ttl_seconds: float = Field(24 * 3600, gt=0, description="Finished jobs are forgotten after this.")
    max_finished_jobs_per_user: int = Field(
        10_000,
        ge=100,
        description="Finished jobs each user keeps at most (their newest); one user's traffic never "
        "evicts another's jobs.",
    )
    idempotency_ttl_seconds: float = Field(
        24 * 3600,
        gt=0,
        description="An Idempotency-Key is remembered this long after its job finished, even once "
        "the job itself has expired: a retry with it is answered with the original job, never run again.",
    )
    max_idempotency_keys_per_user: int = Field(
        1_000_000,
        ge=1000,
        description="Keys of expired jobs each user's retries are remembered by, at most (their "
        "newest; about 150 bytes each).",
    )
    large_result_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description="A result over this many bytes of JSON (a sample of many long candidates) "
        "counts as large: kept large_result_ttl_seconds, within max_result_bytes_per_user.",
    )
    large_result_ttl_seconds: float = Field(
        3600,
        gt=0,
        description="Large results are dropped this long after their job finished (the job stays, "
        "completed, its error saying so).",
    )
    max_result_bytes_per_user: int = Field(
        256 * 1024 * 1024, ge=64 * 1024, description="Bytes of large results each user keeps at most (the newest)."
    )
    # Per-user limits. Not given (None): the default for a server with API keys (shared by several
    # users), none on a keyless loopback server (one user); 0: no limit.
    max_runs_per_user: int | None = Field(
        None,
        ge=0,
        description="Live runs each user may have (default with API keys: 64; each holds its adapter, "
        "gradients and optimizer state in memory, about 0.44 GB at rank 64 on Qwen2-0.5B).",
    )
    max_checkpoints_per_user: int | None = Field(
        None,
        ge=0,
        description="Checkpoints each user may have listed, saves queued included (default with API keys: 512).",
    )
    max_checkpoint_bytes_per_user: int | None = Field(
        None,
        ge=0,
        description="Bytes of checkpoints on disk after which a user's further saves are refused "
        "(default with API keys: 50 GiB).",
    )
    max_sample_tokens_in_flight_per_user: int | None = Field(
        None,
        ge=0,
        description="Tokens each user's unfinished samples may hold, counted as max_tokens_per_request "
        "counts them (default with API keys: 2 x max_tokens_per_request).",
    )
    max_queued_jobs_per_user: int | None = Field(
        None, ge=0, description="Jobs each user may have queued or running (default with API keys: 1024)."
    )
    tinker_session_timeout_seconds: float = Field(
        600,
        gt=0,
        description="A Tinker session without a heartbeat for this long has ended (the SDK beats every 10 s).",
    )
    shutdown_grace_seconds: float = Field(
        30,
        ge=0,
        description="On SIGTERM the server stops accepting connections, fails every queued job at once "
        "(as interrupted: a client's retry after the restart runs it), and gives running jobs this long to finish; "
        "a sample still decoding then stops, and any other job still running is marked interrupted at the next start.",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins to allow (off when empty).")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names a server without API keys answers besides localhost, "
        "127.0.0.1 and [::1] (its Host check against DNS rebinding); '*' turns the check off.",
    )
    checkpoint_sweep_seconds: float = Field(
        60,
        gt=0,
        description="How often the server deletes expired checkpoints (a Tinker ttl_seconds) and those of "
        "deleted runs; expired ones are refused from the moment they expire.",
    )
    sampler_snapshots_kept: int = Field(
        4,
        ge=1,
        description="Unnamed sampler snapshots (save_weights_and_get_sampling_client) a run keeps: older ones "
        "are deleted as new ones are saved. Named checkpoints are never pruned.",
    )
    download_url_seconds: float = Field(
        3600,
        gt=0,
        description="How long a signed checkpoint download URL (Tinker archive or external weights) works.",
    )
    _user_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if isinstance(value, str):  # EZTINKER_MODEL="a,b" or one name
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, dict):  # a settings file's table: {served name: source}
            value = [f"{name}={source}" for name, source in value.items()]
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("give at least one base model")
            try:
                names = [served_name(v) for v in value] if all(isinstance(v, str) for v in value) else value
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            if len(set(names)) != len(names):
                raise ValueError(f"each base model (served name) once, got {list(value)}")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):  # EZTINKER_DEVICE="cuda:0,m=cuda:1" or one device
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key")
    @classmethod
    def _non_blank_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A blank key once passed the public-bind check and then matched requests carrying no key.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("the API key is empty or blank: give a real key (or none, on loopback)")
        return value

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> ServerSettings:
        """Settings from a JSON or TOML file, `overrides` (CLI flags) taking precedence."""
        try:
            text = Path(path).read_text()
            values = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ValueError(f"settings file {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"settings file {path} must hold an object of settings")
        return cls(**{**values, **overrides})

    @model_validator(mode="after")
    def _read_keys(self) -> ServerSettings:
        # Read now, once: a bad keys file is reported before any model loads, and the keys the
        # server uses are the keys that were checked.
        keys = {} if self.api_key is None else {self.api_key.get_secret_value(): "default"}
        if self.api_keys_file is not None:
            keys.update(_read_keys_file(self.api_keys_file))
        self._user_keys = keys
        return self

    @model_validator(mode="after")
    def _key_for_public_bind(self) -> ServerSettings:
        if not self.is_loopback and self.api_key is None and self.api_keys_file is None:
            raise ValueError(
                f"binding to {self.host} exposes the server beyond this machine: "
                "give --api-key (or EZTINKER_API_KEY) or --api-keys-file"
            )
        return self

    @model_validator(mode="after")
    def _ray_settings(self) -> ServerSettings:
        if self.backend != "ray":
            given = [
                flag
                for flag, value in (
                    ("--ray-address", self.ray_address),
                    ("--workers-per-model", self.workers_per_model != [1]),
                    ("--worker-cpus", self.worker_cpus != 1),
                    ("--worker-gpus", self.worker_gpus is not None),
                )
                if value
            ]
            if given:
                raise ValueError(f"{', '.join(given)} needs --backend ray")
        if len(self.workers_per_model) not in (1, len(self.model)) or min(self.workers_per_model, default=0) < 1:
            raise ValueError(
                f"--workers-per-model: give one number >= 1 for every model, or one per --model "
                f"({len(self.model)}), got {self.workers_per_model}"
            )
        return self

    def user_limits(self) -> UserLimits:
        """The per-user limits in force: given values (0: none), else the keyed server's defaults."""
        keyed = bool(self._user_keys)

        def pick(given: int | None, default: int) -> int | None:
            value = given if given is not None else (default if keyed else 0)
            return value or None

        return UserLimits(
            runs=pick(self.max_runs_per_user, 64),
            checkpoints=pick(self.max_checkpoints_per_user, 512),
            checkpoint_bytes=pick(self.max_checkpoint_bytes_per_user, 50 * 1024**3),
            sample_tokens=pick(self.max_sample_tokens_in_flight_per_user, 2 * self.max_tokens_per_request),
            queued_jobs=pick(self.max_queued_jobs_per_user, 1024),
        )

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            job_ttl_s=self.job_ttl_seconds,
            max_jobs_per_user=self.max_finished_jobs_per_user,
            idempotency_ttl_s=self.idempotency_ttl_seconds,
            max_idempotency_keys_per_user=self.max_idempotency_keys_per_user,
            large_result_bytes=self.large_result_bytes,
            large_result_ttl_s=self.large_result_ttl_seconds,
            max_result_bytes_per_user=self.max_result_bytes_per_user,
        )

    @model_validator(mode="after")
    def _device_requests(self) -> ServerSettings:
        from ..device_placement import parse_device_requests

        parse_device_requests(self.model, self.device)  # its form now; the GPUs' count at load
        if self.backend == "ray" and (len(self.device) > 1 or any("=" in d or ":" in d for d in self.device)):
            raise ValueError(
                "--device with --backend ray: one device ('cpu' or 'cuda') for every worker; "
                "Ray gives each worker its GPU (--worker-gpus)"
            )
        return self

    def engine_options(self) -> dict[str, Any]:
        """What each engine is built with (settings of the training forward)."""
        return {"microbatch_tokens": self.microbatch_tokens, "activation_checkpointing": self.activation_checkpointing}

    def checkpoint_root(self) -> Path:
        return (self.checkpoint_dir or self.data_dir / "checkpoints").resolve()

    def snapshot_root(self) -> Path:
        """Hard-linked copies of what runs loaded (they restore from these): beside the checkpoints,
        on the same file system, so every worker reads them."""
        return (
            self.data_dir / "snapshots" if self.checkpoint_dir is None else self.checkpoint_dir / ".snapshots"
        ).resolve()

    def workers_of(self) -> dict[str, int]:
        """Base model -> how many Ray workers hold it."""
        counts = (
            self.workers_per_model * len(self.model) if len(self.workers_per_model) == 1 else self.workers_per_model
        )
        return dict(zip(self.model, counts))

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def user_keys(self) -> dict[str, str]:
        """API key -> user name; empty when auth is off (loopback without keys)."""
        return dict(self._user_keys)


def _read_keys_file(path: Path) -> dict[str, str]:
    """The {key: user} mapping of an API keys file; a ValueError names the file and the problem,
    never a key (keys are secrets)."""
    try:
        mapping = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"API keys file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"API keys file {path} is not JSON: {exc}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f'API keys file {path} must be a JSON object {{"<key>": "<user>", ...}}')
    if not mapping:
        raise ValueError(f"API keys file {path} holds no keys: give at least one (an empty file would turn auth off)")
    for i, (key, user) in enumerate(mapping.items(), 1):
        if not key.strip():
            raise ValueError(f"API keys file {path}: key {i} is empty or blank")
        if not user.strip():
            raise ValueError(f"API keys file {path}: the user of key {i} is empty or blank")
    return mapping
