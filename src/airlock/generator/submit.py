"""Batch submission: validate a job description against the cache and create jobs and their tasks."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, insert, select, text

from airlock.core.errors import BadInput
from airlock.core.schemas import BatchCreated, BatchSpec, JobSpec, merge_defaults
from airlock.core.states import JobState, TaskState
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.schema import file_kind
from airlock.db.transitions import record_event


def parse_batch(document: Any) -> BatchSpec:
    """A job description (already parsed from JSON or YAML) to a BatchSpec, or BadInput saying why."""
    if not isinstance(document, dict):
        raise BadInput("a job description is a mapping with 'name' and 'jobs'")
    try:
        return BatchSpec.model_validate(merge_defaults(document))
    except (ValidationError, ValueError) as exc:
        raise BadInput(describe_validation(exc)) from exc


def describe_validation(exc: Exception) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for err in exc.errors()[:20]:
        where = ".".join(str(p) for p in err["loc"]) or "(document)"
        lines.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 20
    if more > 0:
        lines.append(f"... and {more} more errors")
    return "invalid job description: " + "; ".join(lines)


def _check_inputs(conn: Connection, spec: BatchSpec) -> None:
    wanted = {i.sha256 for job in spec.jobs for i in job.inputs}
    if not wanted:
        return
    f = schema.files
    cached: dict[str, tuple[int, str]] = {}
    wanted_list = sorted(wanted)
    for start in range(0, len(wanted_list), 500):
        chunk = wanted_list[start : start + 500]
        for row in conn.execute(
            select(f.c.sha256, f.c.size, f.c.adler32).where(file_kind("input"), f.c.sha256.in_(chunk))
        ):
            cached[row.sha256] = (row.size, row.adler32)
    for job in spec.jobs:
        for inp in job.inputs:
            if inp.sha256 not in cached:
                raise BadInput(
                    f"job {job.name!r}: input {inp.name!r} ({inp.sha256[:12]}...) is not in the input cache;"
                    " upload it first (POST /api/v1/inputs)"
                )
            size, adler = cached[inp.sha256]
            if inp.size is not None and inp.size != size:
                raise BadInput(
                    f"job {job.name!r}: input {inp.name!r} is {size} bytes in the cache, not {inp.size}"
                )
            if inp.adler32 is not None and inp.adler32 != adler:
                raise BadInput(f"job {job.name!r}: input {inp.name!r} has adler32 {adler} in the cache")


def job_row(batch_id: int, job: JobSpec, now: Any) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "name": job.name,
        "app": job.app,
        "spec": job.model_dump(mode="json"),
        "cores": job.resources.cores,
        "memory_mb": job.resources.memory_mb,
        "disk_mb": job.resources.disk_mb,
        "copies": job.copies,
        "quorum": job.quorum,
        "max_attempts": job.max_attempts,
        "deadline_s": job.deadline_s,
        "attempts": job.copies,
        "state": JobState.QUEUED.value,
        "created_at": now,
        "updated_at": now,
    }


def submit_batch(conn: Connection, spec: BatchSpec, actor: str) -> BatchCreated:
    """Create the batch, its jobs and `copies` ready tasks per job, all in the caller's transaction."""
    _check_inputs(conn, spec)
    now = utcnow()
    batch_id = conn.execute(
        insert(schema.batches)
        .values(
            name=spec.name,
            owner=spec.owner,
            upstream=spec.upstream,
            upstream_ref=spec.upstream_ref,
            created_at=now,
        )
        .returning(schema.batches.c.id)
    ).scalar_one()
    job_ids = list(
        conn.execute(
            insert(schema.jobs).returning(schema.jobs.c.id, sort_by_parameter_order=True),
            [job_row(batch_id, job, now) for job in spec.jobs],
        ).scalars()
    )
    task_rows = [
        {"job_id": jid, "state": TaskState.READY.value, "created_at": now}
        for jid, job in zip(job_ids, spec.jobs, strict=True)
        for _ in range(job.copies)
    ]
    conn.execute(insert(schema.tasks), task_rows)
    conn.execute(
        insert(schema.events),
        [
            {
                "at": now,
                "actor": actor,
                "action": "job.submitted",
                "object_type": "job",
                "object_id": jid,
                "detail": {"batch_id": batch_id},
            }
            for jid in job_ids
        ],
    )
    record_event(conn, actor, "batch.submitted", "batch", batch_id, {"jobs": len(job_ids), "name": spec.name})
    return BatchCreated(batch_id=batch_id, jobs=job_ids)


ANALYZE_AFTER_JOBS = 500


def refresh_statistics(engine: Engine, n_jobs: int) -> None:
    """After a large submission on PostgreSQL, refresh the planner's statistics at once: with a freshly
    filled `tasks` table it would otherwise think there are a handful of ready tasks and sort them all
    on every work request until autovacuum catches up."""
    if n_jobs >= ANALYZE_AFTER_JOBS and engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("ANALYZE tasks, jobs"))
            conn.commit()
