"""Per-user limits on a shared server, and the fair queue that keeps one user's backlog from
starving another's.

Limits bound what one user can hold (runs, checkpoints and their bytes) and have in flight
(queued jobs, sampling tokens). A refusal is a 429 naming the limit; `clears` says whether
waiting can help (work in flight finishes) or not (the user must delete something, or ask for
less), which decides how each protocol answers it (see docs/reliability.md, "Sharing").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backend.commands import Command, Sample

if TYPE_CHECKING:
    from .runner import Job


@dataclass(frozen=True)
class UserLimits:
    """What each user may hold and have in flight; None: no limit."""

    runs: int | None = None  # live runs
    checkpoints: int | None = None  # listed checkpoints, and saves queued
    checkpoint_bytes: int | None = None  # bytes of the user's checkpoints on disk
    sample_tokens: int | None = None  # (prompt + max_tokens) x candidates of the user's unfinished samples
    queued_jobs: int | None = None  # the user's unfinished jobs


@dataclass(frozen=True)
class Refusal:
    limit: str  # the setting's name
    message: str
    clears: bool  # waiting for the user's work in flight can make room


def sample_tokens(command: Command) -> int:
    """The tokens a sample makes the model hold: every candidate's KV cache is as wide as its
    prompt plus max_tokens (the measure max_tokens_per_request bounds, per request)."""
    if not isinstance(command, Sample):
        return 0
    return sum(len(p) + command.sampling_params.max_tokens for p in command.prompts) * command.num_samples


def _within(command: Command, bound: int | None) -> bool:
    """Whether `command` may join a batch whose leader samples at most `bound` tokens (None: no bound)."""
    return bound is None or (isinstance(command, Sample) and command.sampling_params.max_tokens <= bound)


class InFlight:
    """Each user's unfinished jobs and sampling tokens, counted from admission to recording.
    Not thread-safe: the runner holds its lock around every call."""

    def __init__(self) -> None:
        self._jobs: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._admitted: dict[str, tuple[str, int]] = {}  # job id -> (owner, tokens)

    def admit(self, job: Job, limits: UserLimits) -> Refusal | None:
        owner, tokens = job.owner, sample_tokens(job.command)
        if limits.queued_jobs is not None and self._jobs.get(owner, 0) >= limits.queued_jobs:
            return Refusal(
                "max_queued_jobs_per_user",
                f"you have {self._jobs[owner]} jobs queued or running; the "
                f"limit is max_queued_jobs_per_user ({limits.queued_jobs}): wait for some to finish",
                clears=True,
            )
        if limits.sample_tokens is not None and tokens:
            if tokens > limits.sample_tokens:
                return Refusal(
                    "max_sample_tokens_in_flight_per_user",
                    f"this sample holds {tokens} tokens ((prompt + "
                    "max_tokens) x candidates); the limit is max_sample_tokens_in_flight_per_user "
                    f"({limits.sample_tokens}): ask for fewer candidates or max_tokens",
                    clears=False,
                )
            held = self._tokens.get(owner, 0)
            if held + tokens > limits.sample_tokens:
                return Refusal(
                    "max_sample_tokens_in_flight_per_user",
                    f"your unfinished samples hold {held} tokens, "
                    f"this one {tokens}; the limit is max_sample_tokens_in_flight_per_user "
                    f"({limits.sample_tokens}): wait for some to finish",
                    clears=True,
                )
        self._admitted[job.id] = (owner, tokens)
        self._jobs[owner] = self._jobs.get(owner, 0) + 1
        self._tokens[owner] = self._tokens.get(owner, 0) + tokens
        return None

    def release(self, job_id: str) -> None:
        entry = self._admitted.pop(job_id, None)
        if entry is None:
            return
        owner, tokens = entry
        self._jobs[owner] -= 1
        self._tokens[owner] -= tokens
        if not self._jobs[owner]:
            del self._jobs[owner], self._tokens[owner]

    def jobs(self, owner: str) -> int:
        return self._jobs.get(owner, 0)


class FairQueue:
    """A lane's queued jobs: one FIFO per user, the user served least recently going first, so a
    user's backlog delays another user by at most one batch, not by the whole backlog (and a user
    who comes back after a pause is served next).

    A batch is led by the head job of the user whose turn it is; fusable jobs (samples of the
    same base model) join it from the heads of every user's queue, so each user's order holds,
    as long as they are no longer than the leader (max_tokens): a long sample does not join a
    short one's batch and hold its result back."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Job]] = {}
        self._served: dict[str, int] = {}  # user -> when last served (a batch counter)
        self._batches = 0

    def append(self, job: Job) -> None:
        self._queues.setdefault(job.owner, deque()).append(job)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __iter__(self) -> Iterator[Job]:
        for queue in self._queues.values():
            yield from queue

    def clear(self) -> None:
        self._queues.clear()

    def remove(self, job: Job) -> None:
        """Take a queued job out (a cancelled sample); ValueError if it is not queued."""
        queue = self._queues.get(job.owner)
        if queue is None:
            raise ValueError(f"job {job.id} is not queued")
        queue.remove(job)
        if not queue:
            del self._queues[job.owner]

    def take(self, fusable: Callable[[Command, Command], bool]) -> list[Job]:
        """The next batch: the head of the user whose turn it is, then whatever may join it."""
        owner = min(self._queues, key=lambda user: self._served.get(user, -1))
        self._batches += 1
        self._served[owner] = self._batches
        queue = self._queues[owner]
        batch = [queue.popleft()]
        if not queue:
            del self._queues[owner]
        self.join(batch, fusable)
        return batch

    def join(self, batch: list[Job], fusable: Callable[[Command, Command], bool]) -> bool:
        """Move the jobs that may join `batch` from the heads of the queues into it; whether any did."""
        leader = batch[0].command
        bound = leader.sampling_params.max_tokens if isinstance(leader, Sample) else None
        joined = False
        for owner in list(self._queues):
            queue = self._queues[owner]
            while queue and fusable(leader, queue[0].command) and _within(queue[0].command, bound):
                batch.append(queue.popleft())
                joined = True
            if not queue:
                del self._queues[owner]
        return joined
