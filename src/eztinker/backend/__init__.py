"""The interface between the server and the engines that compute.

The server's runner hands a backend plain commands (`commands.py`) and gets plain outcomes back;
it never learns where an engine runs. `LocalBackend` (local.py) holds one engine per base model in
this process; `RayBackend` (ray/) holds them in Ray actors, several per base model, on any host of
a Ray cluster. Importing this package does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..types import LoraConfig, Prompt, SampledToken
from .commands import Command, Outcome


class InvalidInput(ValueError):
    """Input the model cannot take; `loc` is where in the request's field it is (may be empty)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


class WorkerLost(Exception):
    """The worker a command was sent to is gone (its process was killed, its host lost), and with
    it the adapters and optimizer states of `runs`, the runs placed on it; `str()` says so for
    the jobs it fails."""

    def __init__(self, worker: str, runs: Sequence[str], message: str):
        super().__init__(message)
        self.worker, self.runs = worker, list(runs)


@dataclass(frozen=True)
class WorkerInfo:
    """One engine worker of a backend that has several: its base model and the runs placed on it."""

    name: str
    model: str
    alive: bool
    runs: tuple[str, ...]


# Receives a Sample command's newly decoded tokens, from the worker thread.
Progress = Callable[[list[SampledToken]], None]
# Polled by a Sample command after every decode step: True once every consumer of its result is
# gone (a client that disconnected, a session that ended); it then stops decoding and fails with
# ABANDONED in its error.
Cancelled = Callable[[], bool]
ABANDONED = "abandoned"


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know of a base model without touching its weights."""

    name: str
    architecture: str  # e.g. "Qwen2ForCausalLM"
    vocab_size: int
    max_context_length: int
    stop_token_ids: tuple[int, ...]
    tokenizer_id: str  # a local folder or Hub id `AutoTokenizer.from_pretrained` loads
    text_only: bool = True
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointState:
    """A checkpoint's own record of itself (its training_state)."""

    step: int
    lora: LoraConfig
    base_model: str | None
    has_optimizer: bool = True  # False: saved for sampling or export, weights only


class Backend(Protocol):
    def models(self) -> list[ModelInfo]:
        """The base models this backend holds, the default one first."""

    def execute(
        self,
        commands: Sequence[Command],
        progress: Sequence[Progress | None] | None = None,
        lane: Hashable = None,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[Outcome]:
        """Run `commands` in order, one outcome each, on `lane` (one of `lanes()`; None: the
        first lane of the first command, as at start-up). The runner
        passes several commands at once only where `commands.fusable` allows; if a fused batch
        fails, each command is retried alone, so one bad request never fails its neighbours.
        `progress[i]`, when given, receives command i's sampled tokens as they are decoded
        (Sample commands; called from the worker thread, after every decode step). `cancelled[i]`,
        when given, is polled as command i decodes (`Cancelled`). Called from
        one thread per lane; every command of the call is of that lane. Raises WorkerLost when
        the lane's worker is gone."""

    def lanes(self, command: Command) -> Sequence[Hashable]:
        """The workers `command` may run on (the runner's lanes): one for a run's own commands, its
        run's (which keeps them in order), or several for work any worker of its model can do (a
        bare-model or snapshot sample), of which the runner takes the least busy. Lanes run in
        parallel, each in order; a single-worker backend answers [None]."""

    def workers(self) -> list[WorkerInfo]:
        """The engine workers and their runs; empty for a backend of one worker."""

    # Tokenizer work: light, no model weights; called from request handlers (a thread pool).
    def encode_prompt(self, model: str, prompt: Prompt) -> list[int]:
        """Token ids of a prompt given as tokens, chat messages or text; InvalidInput if none."""

    def encode_text(self, model: str, text: str) -> list[int]:
        """Token ids of plain text (no special tokens)."""

    def decode(self, model: str, tokens: list[int]) -> str:
        """The text of token ids, special tokens left out."""

    def token_bytes(self, model: str, tokens: list[int]) -> list[bytes]:
        """Each token's own bytes (a token may hold part of a UTF-8 character)."""

    def tokenizer_files(self, model: str) -> dict[str, str]:
        """The tokenizer's files (name -> text), for clients that render prompts themselves."""

    # The engine's checkpoint format and LoRA rules.
    def check_lora(self, model: str, lora: LoraConfig) -> None:
        """Raise InvalidInput (loc within `lora`) for a config the model cannot take."""

    def read_checkpoint(self, directory: Path) -> CheckpointState:
        """The checkpoint's own record; InvalidInput when it is unreadable."""

    def remove_partial_writes(self, root: Path) -> list[Path]:
        """Delete (or roll back) what interrupted checkpoint writes left below `root`."""

    def close(self) -> None: ...


__all__ = [
    "ABANDONED",
    "Backend",
    "Cancelled",
    "CheckpointState",
    "Command",
    "InvalidInput",
    "ModelInfo",
    "Outcome",
    "Progress",
    "WorkerInfo",
    "WorkerLost",
]
