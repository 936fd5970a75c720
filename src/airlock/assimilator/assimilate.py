"""Move a job's canonical outputs from quarantine to trusted storage and mark the job done.

Exactly-once in effect, whatever the point at which the process dies:
1. copy each output to `trusted/<batch>/<job>/<name>` (to a temporary name, verified, then published;
   a file already there with the same checksums counts as copied, a different one is an error);
2. in ONE transaction: record the trusted files with their provenance and move the job to done;
3. delete the quarantined copies (the janitor does it if we die first).
A crash before 2 redoes 1 harmlessly; a crash after 2 finds the job done and does nothing more.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, insert, select

from airlock.core.checksums import Digest
from airlock.core.faults import crash_point
from airlock.core.states import FileState, JobState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.transitions import transition
from airlock.scheduler.replication import finish_values, revoke_result
from airlock.storage.base import DigestMismatch, Storage
from airlock.storage.xrootd import XRootDStorage

log = logging.getLogger("airlock.assimilator")
ACTOR = "system:assimilator"


def trusted_key(batch_id: int, job_id: int, name: str) -> str:
    return f"trusted/{batch_id}/{job_id}/{name}"


def assimilate_job(engine: Engine, quarantine: Storage, trusted: Storage, job_id: int) -> bool:
    """Assimilate one job; False if it was not (or no longer) waiting for it."""
    j, f, t = schema.jobs, schema.files, schema.tasks
    with read(engine) as conn:
        job = conn.execute(select(j).where(j.c.id == job_id)).one()
        if job.state != JobState.ASSIMILATING.value:
            return False
        task = conn.execute(select(t).where(t.c.id == job.canonical_task_id)).one()
        outputs = conn.execute(
            select(f).where(f.c.kind == "output", f.c.task_id == task.id).order_by(f.c.name)
        ).all()

    copied: list[tuple[Any, str]] = []
    for out in outputs:
        key = trusted_key(job.batch_id, job.id, out.name)
        try:
            _copy_to_trusted(
                quarantine, trusted, out.location, key, Digest(out.size, out.adler32, out.sha256)
            )
        except (DigestMismatch, FileNotFoundError) as exc:
            # The quarantined copy changed or vanished after validation: never assimilate it.
            reason = f"{out.name} in quarantine no longer matches what was validated ({exc})"
            log.error("job %s: %s; revoking task %s", job_id, reason, task.id)
            with engine.begin() as conn:
                revoke_result(conn, task.id, ACTOR, reason)
            return False
        copied.append((out, key))
        crash_point("assimilate.after_copy")

    now = utcnow()
    with engine.begin() as conn:
        if not transition(
            conn,
            JobState.DONE,
            job_id,
            ACTOR,
            values=finish_values(),
            detail={
                "canonical_task": task.id,
                "volunteer_id": task.volunteer_id,
                "host_id": task.host_id,
                "files": [
                    {"name": o.name, "sha256": o.sha256, "adler32": o.adler32, "size": o.size}
                    for o, _ in copied
                ],
            },
        ):
            return False  # another assimilator finished it
        for out, key in copied:
            conn.execute(
                insert(f).values(
                    kind="trusted",
                    state=FileState.TRUSTED.value,
                    name=out.name,
                    size=out.size,
                    adler32=out.adler32,
                    sha256=out.sha256,
                    location=key,
                    job_id=job.id,
                    task_id=task.id,
                    volunteer_id=task.volunteer_id,
                    host_id=task.host_id,
                    created_at=now,
                )
            )
        crash_point("assimilate.before_commit")
    crash_point("assimilate.after_commit")
    for out, _ in copied:
        _delete_quarantined(engine, quarantine, out.id, out.location)
    log.info("job %s done: %d outputs in trusted storage", job_id, len(copied))
    return True


def _copy_to_trusted(
    quarantine: Storage, trusted: Storage, location: str, key: str, expected: Digest
) -> None:
    """Copy, verify, publish; idempotent (an identical file already at `key` counts as copied)."""
    src = quarantine.local_path(location)
    if src is not None:
        trusted.copy_in(key, src, expected)
    elif isinstance(quarantine, XRootDStorage) and isinstance(trusted, XRootDStorage):
        trusted.copy_from(quarantine, location, key, expected)  # with the gateway's own storage token
    else:
        raise NotImplementedError(f"assimilating from {quarantine.name} into {trusted.name}")


def _delete_quarantined(engine: Engine, quarantine: Storage, file_id: int, location: str) -> None:
    quarantine.delete(location)
    with engine.begin() as conn:
        transition(conn, FileState.DELETED, file_id, ACTOR, detail={"reason": "assimilated"})


def assimilate_pending(engine: Engine, quarantine: Storage, trusted: Storage, *, limit: int = 100) -> int:
    j = schema.jobs
    with read(engine) as conn:
        ids = (
            conn.execute(
                select(j.c.id).where(j.c.state == JobState.ASSIMILATING.value).order_by(j.c.id).limit(limit)
            )
            .scalars()
            .all()
        )
    n = 0
    for job_id in ids:
        try:
            n += assimilate_job(engine, quarantine, trusted, job_id)
        except Exception:
            log.exception("assimilating job %s failed; will retry", job_id)
    return n
