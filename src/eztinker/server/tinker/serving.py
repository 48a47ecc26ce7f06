"""The Tinker protocol's serving logic, behind the thin routes of router.py.

`TinkerServing` holds the protocol's own state explicitly: the client sessions and sampling
sessions (in the database), the per-model training order (`Sequencer`) and what a future's
answer needs beyond its job's result (`FutureExtras`). Each operation returns a typed value
(`FutureRef`, or a protocol body); requests the service refuses become failed futures with
category "user", as Tinker reports errors through futures.

It joins its parts, one job each, over the state they share (core.py): sessions.py, training.py,
weights.py (save and load), sampling.py, answers.py (a future's answer) and runs.py (RestClient's
listings), as `Service` joins its own.
"""

from __future__ import annotations

from ..service import Service
from .answers import AnswersPart
from .core import Sequencer, SessionLiveness
from .futures import FutureExtras
from .provenance import StabilityRecords
from .runs import RunsPart
from .sampling import SamplingPart
from .sessions import SessionsPart
from .training import TrainingPart
from .weights import WeightsPart


class TinkerServing(SessionsPart, TrainingPart, WeightsPart, SamplingPart, AnswersPart, RunsPart):
    """The Tinker protocol over one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.sequencer = Sequencer()
        self.extras = FutureExtras()
        self.stability = StabilityRecords()
        self.liveness = SessionLiveness(service.settings.tinker_session_timeout_seconds)
