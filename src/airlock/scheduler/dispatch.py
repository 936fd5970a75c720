"""Dispatch: give a host the ready tasks that fit it, each under a lease, with a per-task upload token."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, exists, insert, select, update
from sqlalchemy.orm import aliased

from airlock.config import Settings
from airlock.core.errors import Forbidden, NotFound
from airlock.core.schemas import (
    HostRegistered,
    HostRegistration,
    InputRef,
    OutputRef,
    Resources,
    TaskAssignment,
    WorkReply,
    WorkRequest,
)
from airlock.core.states import JobState, TaskState
from airlock.credentials.accounts import require_active
from airlock.credentials.tokens import TokenIssuer, quarantine_path, record_credential
from airlock.db import schema
from airlock.db.engine import is_sqlite, utcnow
from airlock.db.transitions import record_event, transition
from airlock.scheduler.quota import remaining, today

CANDIDATES_PER_SLOT = 4


def register_host(
    conn: Connection, settings: Settings, volunteer_id: int, req: HostRegistration
) -> HostRegistered:
    require_active(conn, volunteer_id)
    now = utcnow()
    host_id = conn.execute(
        insert(schema.hosts)
        .values(
            volunteer_id=volunteer_id,
            name=req.name,
            platform=req.platform,
            cores=req.cores,
            memory_mb=req.memory_mb,
            disk_mb=req.disk_mb,
            daily_quota=settings.daily_quota_per_core,
            quota_day=today(now),
            dispatched_today=0,
            created_at=now,
            last_seen=now,
        )
        .returning(schema.hosts.c.id)
    ).scalar_one()
    record_event(conn, f"volunteer:{volunteer_id}", "host.registered", "host", host_id, req.model_dump())
    return HostRegistered(host_id=host_id, daily_quota=settings.daily_quota_per_core)


def own_host(conn: Connection, volunteer_id: int, host_id: int) -> Any:
    h = schema.hosts
    host = conn.execute(select(h).where(h.c.id == host_id)).one_or_none()
    if host is None:
        raise NotFound(f"no host {host_id}")
    if host.volunteer_id != volunteer_id:
        raise Forbidden(f"host {host_id} belongs to another volunteer")
    return host


def request_work(
    conn: Connection, settings: Settings, issuer: TokenIssuer, volunteer_id: int, req: WorkRequest
) -> WorkReply:
    require_active(conn, volunteer_id)
    host = own_host(conn, volunteer_id, req.host_id)
    now = utcnow()
    allowed = remaining(host.daily_quota, host.cores, host.quota_day, host.dispatched_today, now)
    if allowed <= 0:
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
        conn.execute(update(schema.hosts).where(schema.hosts.c.id == host.id).values(last_seen=now))
        return WorkReply(
            tasks=[],
            retry_after_s=min(int((midnight - now).total_seconds()) + 1, 3600),
            message=f"this host reached its daily quota ({host.daily_quota} per core)",
        )
    wanted = min(req.slots, allowed)
    cores = min(host.cores, req.free_cores if req.free_cores is not None else host.cores)
    memory = min(host.memory_mb, req.free_memory_mb if req.free_memory_mb is not None else host.memory_mb)
    disk = min(host.disk_mb, req.free_disk_mb if req.free_disk_mb is not None else host.disk_mb)

    t, j = schema.tasks, schema.jobs
    mine = aliased(schema.tasks)
    query = (
        select(
            t.c.id,
            t.c.job_id,
            j.c.state.label("job_state"),
            j.c.spec,
            j.c.app,
            j.c.cores,
            j.c.memory_mb,
            j.c.disk_mb,
            j.c.deadline_s,
        )
        .join(j, j.c.id == t.c.job_id)
        .where(
            t.c.state == TaskState.READY.value,
            j.c.state.in_([JobState.QUEUED.value, JobState.RUNNING.value, JobState.VALIDATING.value]),
            j.c.cores <= cores,
            j.c.memory_mb <= memory,
            j.c.disk_mb <= disk,
            ~exists().where(and_(mine.c.job_id == t.c.job_id, mine.c.volunteer_id == volunteer_id)),
        )
        .order_by(t.c.id)
        .limit(wanted * CANDIDATES_PER_SLOT)
    )
    if not is_sqlite(conn):
        query = query.with_for_update(of=t, skip_locked=True)
    candidates = conn.execute(query).all()

    assignments: list[TaskAssignment] = []
    jobs_taken: set[int] = set()
    actor = f"host:{host.id}"
    for cand in candidates:
        if len(assignments) >= wanted:
            break
        if cand.job_id in jobs_taken or cand.cores > cores or cand.memory_mb > memory or cand.disk_mb > disk:
            continue
        lease_expires = now + timedelta(seconds=settings.lease_s)
        deadline = now + timedelta(seconds=cand.deadline_s)
        if not transition(
            conn,
            TaskState.LEASED,
            cand.id,
            actor,
            values={
                "volunteer_id": volunteer_id,
                "host_id": host.id,
                "leased_at": now,
                "lease_expires_at": min(lease_expires, deadline),
                "deadline": deadline,
            },
            detail={"volunteer_id": volunteer_id},
        ):
            continue  # taken by a concurrent dispatcher
        if cand.job_state == JobState.QUEUED.value:
            transition(conn, JobState.RUNNING, cand.job_id, actor)
        jobs_taken.add(cand.job_id)
        cores, memory, disk = cores - cand.cores, memory - cand.memory_mb, disk - cand.disk_mb
        assignments.append(
            _assignment(
                conn, settings, issuer, volunteer_id, cand, now, min(lease_expires, deadline), deadline
            )
        )

    used = (host.dispatched_today if host.quota_day == today(now) else 0) + len(assignments)
    conn.execute(
        update(schema.hosts)
        .where(schema.hosts.c.id == host.id)
        .values(last_seen=now, quota_day=today(now), dispatched_today=used)
    )
    return WorkReply(
        tasks=assignments,
        retry_after_s=0 if assignments else settings.retry_after_s,
        message=None if assignments else "no work for this host right now",
    )


def _assignment(
    conn: Connection,
    settings: Settings,
    issuer: TokenIssuer,
    volunteer_id: int,
    cand: Any,
    now: datetime,
    lease_expires: datetime,
    deadline: datetime,
) -> TaskAssignment:
    spec = cand.spec
    base = settings.public_url
    path = quarantine_path(volunteer_id, cand.id)
    upload = issuer.issue(volunteer_id, [f"storage.create:{path}"], now, deadline - now)
    record_credential(conn, upload, "upload", volunteer_id, cand.id)
    inputs = []
    if spec["inputs"]:
        f = schema.files
        digests = {
            r.sha256: r
            for r in conn.execute(
                select(f.c.sha256, f.c.size, f.c.adler32).where(
                    f.c.kind == "input", f.c.sha256.in_([i["sha256"] for i in spec["inputs"]])
                )
            )
        }
        for inp in spec["inputs"]:
            d = digests[inp["sha256"]]
            inputs.append(
                InputRef(
                    name=inp["name"],
                    url=f"{base}/api/v1/inputs/{d.sha256}",
                    size=d.size,
                    adler32=d.adler32,
                    sha256=d.sha256,
                )
            )
    return TaskAssignment(
        task_id=cand.id,
        job_id=cand.job_id,
        app=cand.app,
        command=spec["command"],
        env=spec.get("env") or {},
        inputs=inputs,
        outputs=[
            OutputRef(name=o["name"], max_size=o["max_size"], upload_url=f"{base}{path}/{o['name']}")
            for o in spec["outputs"]
        ],
        resources=Resources.model_validate(spec["resources"]),
        lease_expires_at=lease_expires,
        deadline=deadline,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        upload_token=upload.token,
    )
