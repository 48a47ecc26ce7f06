"""SQLite record of runs, jobs, checkpoints and sessions: what must survive a restart.

`Store` is one database (database.py: its connections; schema.py: its tables) seen through one
class per table. Every method returns frozen records (records.py), never the driver's rows.
"""

from __future__ import annotations

from ..records import INTERRUPTED, CheckpointLifecycle, JobRecord, new_id
from .checkpoints import CheckpointTable
from .database import BUSY_TIMEOUT_SECONDS, Database, is_busy
from .jobs import JobTable
from .runs import RunTable
from .sessions import SessionTable
from .training import TrainingLog

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "INTERRUPTED",
    "CheckpointLifecycle",
    "Database",
    "JobRecord",
    "Store",
    "is_busy",
    "new_id",
]


class Store(RunTable, CheckpointTable, JobTable, TrainingLog, SessionTable):
    """The server's database: runs, checkpoints, jobs, training log and evaluations, sessions."""
