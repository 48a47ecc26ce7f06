"""The store's tables, and the changes that bring a database made by an older server up to them."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora TEXT NOT NULL,
    seed INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    restored_from TEXT,
    resume_from TEXT,  -- checkpoint the live state was last saved to or loaded from
    resume_path TEXT,  -- after a load: the private snapshot of it to restore from (runner.py)
    created_at REAL NOT NULL,
    deleted_at REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    step INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    run_id TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS sessions (  -- Tinker client sessions
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS samplers (  -- Tinker sampling sessions: a base model, or a saved adapter
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    checkpoint TEXT,  -- '<run_id>/<name>'; NULL: the bare base model
    model_path TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS training_log (  -- what each forward_backward / optim_step reported: a run's curves
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,  -- the optimizer step the job belongs to: a gradient goes into the run's step + 1
    kind TEXT NOT NULL,
    loss REAL,              -- forward_backward: summed over the batch
    num_tokens INTEGER,     -- forward_backward: positions that carried loss
    weight_sum REAL,        -- forward_backward, cross_entropy: the sum of its weights (the loss's denominator)
    grad_norm REAL,         -- optim_step
    learning_rate REAL,     -- optim_step
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS training_log_run ON training_log(run_id, step);
CREATE TABLE IF NOT EXISTS evaluations (  -- harness results (lm-eval) of a run's adapter or checkpoint, as reported
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    checkpoint TEXT,        -- its name; NULL: the run's live adapter
    step INTEGER NOT NULL,  -- the adapter's optimizer step
    report TEXT NOT NULL,   -- JSON: harness, tasks, scores, config
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_run ON evaluations(run_id, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (  -- keys of expired jobs, kept idempotency_ttl_seconds (retention.py)
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request_hash TEXT,
    status TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
"""
# After the columns added since the first schema: retention reads sizes from the index alone
# (a column stored after a large result would make SQLite walk the result's overflow pages).
LATE_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_owner_results ON jobs(owner, finished_at, result_bytes);"

# Checkpoint columns added since the first schema: `auto` 1 for a snapshot the server saved
# unnamed (only those are pruned), `expires_at` when the server deletes it (NULL: never), `public`
# 1 when other users may load and sample it, `meta` JSON (the protocol's own: user metadata...).
CHECKPOINT_COLUMNS = (
    ("checkpoints", "auto", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "expires_at", "REAL"),
    ("checkpoints", "public", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "meta", "TEXT"),
)


# Columns added since the first schema, for databases made before them.
LATE_COLUMNS = (
    ("jobs", "error_category", "TEXT"),
    ("runs", "metadata", "TEXT"),
    ("runs", "resume_path", "TEXT"),
    ("training_log", "weight_sum", "REAL"),
    ("jobs", "result_bytes", "INTEGER"),
    *CHECKPOINT_COLUMNS,
)


def migrate(db: sqlite3.Connection) -> None:
    """Create what is missing (tables, then late columns, then indexes on them); the caller holds `db`."""
    db.executescript(SCHEMA)
    _add_missing_columns(db)
    db.executescript(LATE_INDEXES)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, column, kind in LATE_COLUMNS:
        names = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in names:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            if (table, column) == ("checkpoints", "auto"):
                # Made before the column: a sampler snapshot the server saved unnamed is the one an
                # unnamed sampling session (no model_path) samples from.
                db.execute(
                    "UPDATE checkpoints SET auto = 1 WHERE run_id || '/' || name IN"
                    " (SELECT checkpoint FROM samplers WHERE model_path IS NULL AND checkpoint IS NOT NULL)"
                )
