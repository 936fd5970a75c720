"""Read models for the operator API: batches, jobs with their tasks and files, hosts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from airlock.core.errors import NotFound
from airlock.core.schemas import BatchView, FileView, HostView, JobView, TaskView
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.schema import file_kind
from airlock.scheduler.quota import today


def batch_view(conn: Connection, row: Any) -> BatchView:
    j = schema.jobs
    rows = conn.execute(select(j.c.state, func.count()).where(j.c.batch_id == row.id).group_by(j.c.state))
    counts: dict[str, int] = {state: n for state, n in rows}
    return BatchView(
        id=row.id,
        name=row.name,
        owner=row.owner,
        upstream=row.upstream,
        upstream_ref=row.upstream_ref,
        created_at=row.created_at,
        jobs_by_state=counts,
    )


def list_batches(conn: Connection) -> list[BatchView]:
    return [batch_view(conn, r) for r in conn.execute(select(schema.batches).order_by(schema.batches.c.id))]


def get_batch(conn: Connection, batch_id: int) -> BatchView:
    row = conn.execute(select(schema.batches).where(schema.batches.c.id == batch_id)).one_or_none()
    if row is None:
        raise NotFound(f"no batch {batch_id}")
    return batch_view(conn, row)


def _task_view(r: Any) -> TaskView:
    return TaskView(
        id=r.id,
        job_id=r.job_id,
        state=r.state,
        volunteer_id=r.volunteer_id,
        host_id=r.host_id,
        leased_at=r.leased_at,
        reported_at=r.reported_at,
        exit_code=r.exit_code,
        verdict=r.verdict,
    )


def _file_view(r: Any) -> FileView:
    return FileView(
        name=r.name,
        size=r.size,
        adler32=r.adler32,
        sha256=r.sha256,
        state=r.state,
        task_id=r.task_id,
        volunteer_id=r.volunteer_id,
        host_id=r.host_id,
    )


def _job_view(r: Any, tasks: list[TaskView] | None = None, outputs: list[FileView] | None = None) -> JobView:
    return JobView(
        id=r.id,
        batch_id=r.batch_id,
        name=r.name,
        app=r.app,
        state=r.state,
        attempts=r.attempts,
        copies=r.copies,
        quorum=r.quorum,
        canonical_task_id=r.canonical_task_id,
        created_at=r.created_at,
        finished_at=r.finished_at,
        tasks=tasks or [],
        outputs=outputs or [],
    )


def list_jobs(
    conn: Connection, batch_id: int | None, state: str | None, limit: int, offset: int
) -> list[JobView]:
    j = schema.jobs
    q = select(j).order_by(j.c.id).limit(limit).offset(offset)
    if batch_id is not None:
        q = q.where(j.c.batch_id == batch_id)
    if state is not None:
        q = q.where(j.c.state == state)
    return [_job_view(r) for r in conn.execute(q)]


def get_job(conn: Connection, job_id: int) -> JobView:
    j, t, f = schema.jobs, schema.tasks, schema.files
    row = conn.execute(select(j).where(j.c.id == job_id)).one_or_none()
    if row is None:
        raise NotFound(f"no job {job_id}")
    tasks = [_task_view(r) for r in conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.id))]
    outputs = [
        _file_view(r)
        for r in conn.execute(select(f).where(file_kind("trusted"), f.c.job_id == job_id).order_by(f.c.name))
    ]
    return _job_view(row, tasks, outputs)


def trusted_output(conn: Connection, job_id: int, name: str) -> Any:
    f = schema.files
    row = conn.execute(
        select(f).where(file_kind("trusted"), f.c.job_id == job_id, f.c.name == name)
    ).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} has no validated output {name!r}")
    return row


def list_hosts(conn: Connection) -> list[HostView]:
    day = today(utcnow())
    return [
        HostView(
            id=r.id,
            volunteer_id=r.volunteer_id,
            name=r.name,
            platform=r.platform,
            cores=r.cores,
            memory_mb=r.memory_mb,
            disk_mb=r.disk_mb,
            daily_quota=r.daily_quota,
            dispatched_today=r.dispatched_today if r.quota_day == day else 0,
            n_valid=r.n_valid,
            n_invalid=r.n_invalid,
            n_error=r.n_error,
            n_lost=r.n_lost,
            last_seen=r.last_seen,
        )
        for r in conn.execute(select(schema.hosts).order_by(schema.hosts.c.id))
    ]
