"""The janitor: removes quarantine leftovers once nothing can need them.

A quarantined file goes when its task ended badly (invalid, error, lost, aborted) or its job is final,
and it is older than the retention period (so an operator can inspect rejected output for a while).
Files go first, then one transaction records a batch of them as deleted; a crash in between leaves rows
whose files are gone, which the next pass records (deleting a missing file is no error).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import Engine, or_, select

from airlock.config import Settings
from airlock.core.states import JOB_FINAL, FileState, TaskState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.schema import file_kind
from airlock.db.transitions import transition_many
from airlock.storage.base import Storage

log = logging.getLogger("airlock.janitor")
ACTOR = "system:janitor"
PARTIAL_MAX_AGE_S = 3600  # far longer than any upload in progress takes
BATCH = 100  # deletions recorded per write transaction (a busy gateway's writer turn is a wait each)
_BAD = [TaskState.INVALID.value, TaskState.ERROR.value, TaskState.LOST.value, TaskState.ABORTED.value]


def sweep_quarantine(
    engine: Engine,
    quarantine: Storage,
    settings: Settings,
    *,
    limit: int = 1000,
    trusted: Storage | None = None,
) -> int:
    """Delete expired quarantined outputs, then temporaries of writes that died half-way in quarantine
    (and in trusted storage, when given: the assimilator's copies)."""
    f, t, j = schema.files, schema.tasks, schema.jobs
    cutoff = utcnow() - timedelta(seconds=settings.quarantine_retention_s)
    with read(engine) as conn:
        rows = conn.execute(
            select(f.c.id, f.c.location)
            .join(t, t.c.id == f.c.task_id)
            .join(j, j.c.id == t.c.job_id)
            .where(
                file_kind("output"),
                f.c.state == FileState.QUARANTINED.value,
                f.c.created_at <= cutoff,
                or_(t.c.state.in_(_BAD), j.c.state.in_([s.value for s in JOB_FINAL])),
            )
            .limit(limit)
        ).all()
    for i in range(0, len(rows), BATCH):  # the files first, then one transaction records a batch of them
        chunk = rows[i : i + BATCH]
        for _fid, location in chunk:
            quarantine.delete(location)
        with engine.begin() as conn:
            reason = {"reason": "retention over"}
            transition_many(conn, FileState.DELETED, {fid: reason for fid, _location in chunk}, ACTOR)
    partials = quarantine.sweep_partials("quarantine", PARTIAL_MAX_AGE_S)
    if trusted is not None:
        partials += trusted.sweep_partials("trusted", PARTIAL_MAX_AGE_S)
    if rows or partials:
        log.info("janitor removed %d quarantined files and %d partial uploads", len(rows), partials)
    return len(rows) + partials
