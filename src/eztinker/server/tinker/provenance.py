"""What stable_reinforce needs from sampling time: recorded sequences, and the provenance that
names them in a training datum.

A sampling client made with `record_stability_info=True` has every sequence it samples recorded
here under its `sequence_id`: the request's prompt, the sampled tokens and the sampler's own
logprobs of them. A recorded sequence belongs to the Tinker session that sampled it and can be
trained on for a day after sampling; each training request that names it restarts that day
(Tinker's documented lifetime). Records live in the server's memory: a restart forgets them.

A stable_reinforce datum carries provenance (`Datum.with_provenance` in the SDK): runs of
positions that tile its model input and its targets, each naming a sequence and a place in its
prompt or in its sampled tokens. `resolve` checks every run against the record (the tokens must
be the ones sampled) and returns, per target position, the sampler's recorded logprob where a run
of sampled tokens covers it: the importance weight's denominator comes from the server's own
record, not from what the client sends back.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from threading import Lock

RECORD_SECONDS = 24 * 3600.0  # Tinker: "can be trained on for one day after sampling"
MAX_RECORDED_TOKENS = 20_000_000  # all sessions together; the oldest records go first beyond it


class SpanKind(str, Enum):
    PROMPT = "prompt"  # positions of the named request's prompt
    SAMPLED = "sampled"  # positions of the named sequence's sampled tokens


@dataclass(frozen=True)
class ProvenanceSpan:
    kind: SpanKind
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class DatumProvenance:
    """Runs tiling a datum's model input and its target positions, in order."""

    model_input: tuple[ProvenanceSpan, ...]
    targets: tuple[ProvenanceSpan, ...]


@dataclass(frozen=True)
class RecordedSequence:
    session_id: str
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


class ProvenanceError(ValueError):
    """A datum's provenance does not match what was recorded; `loc` names the run."""

    def __init__(self, message: str, loc: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.message, self.loc = message, loc


def session_of_id(tinker_id: str) -> str:
    """'sess_x:train:0' or 'sess_x:sample:3' -> 'sess_x'."""
    return tinker_id.split(":", 1)[0]


class StabilityRecords:
    """Recorded sequences by sequence_id, each with its expiry; thread-safe."""

    def __init__(
        self, lifetime: float = RECORD_SECONDS, max_tokens: int = MAX_RECORDED_TOKENS, clock=time.monotonic
    ) -> None:
        self.lifetime, self.max_tokens, self.clock = lifetime, max_tokens, clock
        self._records: OrderedDict[str, tuple[RecordedSequence, float]] = OrderedDict()
        self._tokens = 0
        self._lock = Lock()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, sequence_id: str, sequence: RecordedSequence) -> None:
        with self._lock:
            if sequence_id in self._records:
                return  # a future answered twice records once
            self._records[sequence_id] = (sequence, self.clock() + self.lifetime)
            self._tokens += _size(sequence)
            self._drop_expired()
            while self._tokens > self.max_tokens and self._records:
                _, (old, _) = self._records.popitem(last=False)
                self._tokens -= _size(old)

    def _drop_expired(self) -> None:
        # Records are kept in order of last use, so the first to expire come first.
        now = self.clock()
        while self._records:
            sequence_id, (old, expires) = next(iter(self._records.items()))
            if expires > now:
                break
            del self._records[sequence_id]
            self._tokens -= _size(old)

    def use(self, sequence_id: str, session_id: str, loc: tuple[str | int, ...]) -> RecordedSequence:
        """The record of `sequence_id`, its day restarted; ProvenanceError unless this session
        recorded it and it has not expired."""
        with self._lock:
            self._drop_expired()
            entry = self._records.get(sequence_id)
            if entry is None or entry[0].session_id != session_id:
                raise ProvenanceError(
                    f"sequence {sequence_id!r} is not a recorded sequence of session {session_id} (sample it with "
                    "record_stability_info=True in this session; records last a day after their last use)",
                    loc,
                )
            self._records[sequence_id] = (entry[0], self.clock() + self.lifetime)
            self._records.move_to_end(sequence_id)
            return entry[0]


def _size(sequence: RecordedSequence) -> int:
    return len(sequence.prompt) + len(sequence.tokens)


def _tokens_of(record: RecordedSequence, span: ProvenanceSpan) -> tuple[int, ...]:
    source = record.prompt if span.kind is SpanKind.PROMPT else record.tokens
    if span.offset + span.length > len(source):
        return ()
    return source[span.offset : span.offset + span.length]


def resolve(
    records: StabilityRecords,
    session_id: str,
    index: int,
    provenance: DatumProvenance,
    tokens: list[int],
    targets: list[int],
) -> list[float | None]:
    """Datum `index`'s recorded sampler logprob at each target position (None where no run of
    sampled tokens covers it). Checks that each run names a recorded sequence of this session
    and that the datum's tokens there are the recorded ones: every model-input run, and the
    sampled runs of the targets (prompt runs of the targets are not compared: recipes pad the
    targets of prompt positions, which carry no loss)."""
    sampler_logprobs: list[float | None] = [None] * len(targets)
    for field_name, spans, values in (
        ("model_input_spans", provenance.model_input, tokens),
        ("loss_fn_input_spans", provenance.targets, targets),
    ):
        position = 0
        for j, span in enumerate(spans):
            loc = ("data", index, field_name, j)
            record = records.use(span.sequence_id, session_id, loc)
            sampled = span.kind is SpanKind.SAMPLED
            source = len(record.tokens if sampled else record.prompt)
            if span.offset + span.length > source:
                raise ProvenanceError(
                    f"data[{index}].{field_name}[{j}] covers {span.kind.value} positions "
                    f"[{span.offset}, {span.offset + span.length}) of sequence {span.sequence_id!r}, "
                    f"which has {source}",
                    loc,
                )
            compare = field_name == "model_input_spans" or sampled
            if compare and tuple(values[position : position + span.length]) != _tokens_of(record, span):
                raise ProvenanceError(
                    f"data[{index}].{field_name}[{j}]: the datum's tokens at positions "
                    f"[{position}, {position + span.length}) are not the {span.kind.value} tokens of sequence "
                    f"{span.sequence_id!r} it names",
                    loc,
                )
            if field_name == "loss_fn_input_spans" and sampled:
                sampler_logprobs[position : position + span.length] = record.logprobs[
                    span.offset : span.offset + span.length
                ]
            position += span.length
    return sampler_logprobs
