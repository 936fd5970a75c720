"""Move a job's canonical outputs from quarantine to trusted storage and mark the job done.

Exactly-once in effect, whatever the point at which the process dies:
1. copy each output to `trusted/<batch>/<job>/<name>` (to a temporary name, verified, then published;
   a file already there with the same checksums counts as copied, a different one is an error), then
   fsync what the batch's copies made, each file and folder once;
2. in ONE transaction: record the trusted files with their provenance and move the job to done;
3. delete the quarantined copies (the janitor does it if we die first); the next batch's transaction
   records them as deleted.
A crash before 2 redoes 1 harmlessly; a crash after 2 finds the job done and does nothing more.
Jobs go BATCH at a time: step 1 for each, step 2 for all of them in one transaction, then step 3. So a
batch takes the writer turn once: on a busy gateway the serving process holds that turn most of the
time, and each wait for it costs the assimilator more than a batch's work. A batch's copies, and then its
deletions, run IO_THREADS at a time: each mostly waits on the disk (an fsync, a link, a folder removed).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from airlock.core.checksums import Digest
from airlock.core.faults import crash_point
from airlock.core.states import FileState, JobState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.schema import file_kind
from airlock.db.transitions import transition_many
from airlock.scheduler.replication import finish_values, revoke_result
from airlock.storage.base import DeferredSyncs, DigestMismatch, Storage
from airlock.storage.xrootd import XRootDStorage

log = logging.getLogger("airlock.assimilator")
ACTOR = "system:assimilator"


def trusted_key(batch_id: int, job_id: int, name: str) -> str:
    return f"trusted/{batch_id}/{job_id}/{name}"


IO_THREADS = 4  # copies or deletions of one batch at once (more cost CPU and gained nothing here)
_IO = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="airlock-assimilate-io")  # threads start on use


BATCH = 100  # jobs per write transaction (one writer turn each; see the validator's BATCH for why this many)


def assimilate_job(engine: Engine, quarantine: Storage, trusted: Storage, job_id: int) -> bool:
    """Assimilate one job; False if it was not (or no longer) waiting for it."""
    n, removed = _assimilate_batch(engine, quarantine, trusted, [job_id], [])
    _record_deleted(engine, removed)
    return n == 1


def _assimilate_batch(
    engine: Engine, quarantine: Storage, trusted: Storage, job_ids: list[int], removed: list[Any]
) -> tuple[int, list[Any]]:
    """Steps 1-3 for several jobs: the copies (IO_THREADS at a time), then ONE transaction marks them all
    done with their provenance (and records as deleted the `removed` files: quarantined copies that an
    earlier batch deleted), then the quarantined copies go. Returns how many jobs this call finished, and
    the files still to be recorded as deleted (this batch's, or `removed` if nothing was committed)."""
    j, f, t = schema.jobs, schema.files, schema.tasks
    with read(engine) as conn:
        jobs = conn.execute(
            select(j).where(j.c.id.in_(job_ids), j.c.state == JobState.ASSIMILATING.value).order_by(j.c.id)
        ).all()
        if not jobs:
            return 0, removed
        tasks = {
            r.id: r
            for r in conn.execute(select(t).where(t.c.id.in_([job.canonical_task_id for job in jobs])))
        }
        outputs: dict[int, list[Any]] = {}
        for out in conn.execute(
            select(f).where(file_kind("output"), f.c.task_id.in_(list(tasks))).order_by(f.c.name)
        ):
            outputs.setdefault(out.task_id, []).append(out)

    syncs = DeferredSyncs()  # the batch's fsyncs, each file and folder once, before the transaction

    def copy(job: Any) -> tuple[Any, Any, list[tuple[Any, str]] | None]:
        task = tasks[job.canonical_task_id]
        try:
            copied = _copy_outputs(engine, quarantine, trusted, job, task, outputs.get(task.id, []), syncs)
            return job, task, copied
        except Exception:  # e.g. storage unreachable: this job waits for the next pass, the others go on
            log.exception("assimilating job %s failed; will retry", job.id)
            return job, task, None

    ready = [(job, task, copied) for job, task, copied in _IO.map(copy, jobs) if copied is not None]
    if not ready:
        return 0, removed
    syncs.flush()  # raises if the disk failed: nothing is recorded, the next pass redoes the batch
    crash_point("assimilate.after_syncs")

    now = utcnow()
    provenance = {
        job.id: {
            "canonical_task": task.id,
            "volunteer_id": task.volunteer_id,
            "host_id": task.host_id,
            "files": [
                {"name": o.name, "sha256": o.sha256, "adler32": o.adler32, "size": o.size} for o, _ in copied
            ],
        }
        for job, task, copied in ready
    }
    with engine.begin() as conn:
        # one statement moves the batch's jobs to done (not those another assimilator finished)
        moved = set(transition_many(conn, JobState.DONE, provenance, ACTOR, values=finish_values()))
        finished = [(job, task, copied) for job, task, copied in ready if job.id in moved]
        trusted_rows = [
            {
                "kind": "trusted",
                "state": FileState.TRUSTED.value,
                "name": out.name,
                "size": out.size,
                "adler32": out.adler32,
                "sha256": out.sha256,
                "location": key,
                "job_id": job.id,
                "task_id": task.id,
                "volunteer_id": task.volunteer_id,
                "host_id": task.host_id,
                "created_at": now,
            }
            for job, task, copied in finished
            for out, key in copied
        ]
        if trusted_rows:
            conn.execute(insert(schema.files), trusted_rows)
        _mark_deleted(conn, removed)
        crash_point("assimilate.before_commit")
    crash_point("assimilate.after_commit")
    if finished:  # one line a batch (each job's outputs are also in its audit event)
        log.info(
            "jobs done, outputs in trusted storage: %s",
            ", ".join(f"{job.id} ({len(copied)})" for job, _task, copied in finished),
        )
    gone = [out for _job, _task, copied in finished for out, _key in copied]
    list(_IO.map(lambda out: quarantine.delete(out.location), gone))  # step 3; an error goes on from here
    return len(finished), gone


def _copy_outputs(
    engine: Engine,
    quarantine: Storage,
    trusted: Storage,
    job: Any,
    task: Any,
    outputs: list[Any],
    syncs: DeferredSyncs | None = None,
) -> list[tuple[Any, str]] | None:
    """Step 1 for one job; None (and the result revoked) if a quarantined file changed after validation."""
    copied: list[tuple[Any, str]] = []
    for out in outputs:
        key = trusted_key(job.batch_id, job.id, out.name)
        try:
            _copy_to_trusted(
                quarantine, trusted, out.location, key, Digest(out.size, out.adler32, out.sha256), syncs
            )
        except (DigestMismatch, FileNotFoundError) as exc:
            # The quarantined copy changed or vanished after validation: never assimilate it.
            reason = f"{out.name} in quarantine no longer matches what was validated ({exc})"
            log.error("job %s: %s; revoking task %s", job.id, reason, task.id)
            with engine.begin() as conn:
                revoke_result(conn, task.id, ACTOR, reason)
            return None
        copied.append((out, key))
        crash_point("assimilate.after_copy")
    return copied


def _copy_to_trusted(
    quarantine: Storage,
    trusted: Storage,
    location: str,
    key: str,
    expected: Digest,
    syncs: DeferredSyncs | None = None,
) -> None:
    """Copy, verify, publish; idempotent (an identical file already at `key` counts as copied). With
    `syncs`, durable only once the caller flushes them."""
    src = quarantine.local_path(location)
    if src is not None:
        trusted.copy_in(key, src, expected, syncs=syncs)
    elif isinstance(quarantine, XRootDStorage) and isinstance(trusted, XRootDStorage):
        trusted.copy_from(quarantine, location, key, expected)  # with the gateway's own storage token
    else:
        raise NotImplementedError(f"assimilating from {quarantine.name} into {trusted.name}")


def _mark_deleted(conn: Connection, files: list[Any]) -> None:
    """Record quarantined copies of assimilated outputs as deleted (they are gone from the quarantine)."""
    transition_many(conn, FileState.DELETED, {out.id: {"reason": "assimilated"} for out in files}, ACTOR)


def _record_deleted(engine: Engine, files: list[Any]) -> None:
    """`_mark_deleted` in a transaction of its own: for the last batch of a pass."""
    if files:
        with engine.begin() as conn:
            _mark_deleted(conn, files)


def assimilate_pending(engine: Engine, quarantine: Storage, trusted: Storage, *, limit: int = 200) -> int:
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
    removed: list[Any] = []  # deleted from the quarantine, to be recorded by the next transaction
    for i in range(0, len(ids), BATCH):
        chunk = list(ids[i : i + BATCH])
        try:
            done, removed = _assimilate_batch(engine, quarantine, trusted, chunk, removed)
            n += done
        except Exception:
            log.exception("assimilating jobs %s-%s failed; will retry", chunk[0], chunk[-1])
    try:
        _record_deleted(engine, removed)
    except Exception:  # the janitor finds them (their jobs are done) and records them
        log.exception("recording %d deleted quarantine copies failed", len(removed))
    return n
