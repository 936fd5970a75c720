"""Dispatch: give a host the ready tasks that fit it, each under a lease, with a per-task upload token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    and_,
    bindparam,
    cast,
    exists,
    insert,
    literal_column,
    select,
    update,
)
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
from airlock.core.states import TASK_NO_RESULT, JobState, TaskState, VolunteerState
from airlock.credentials.accounts import require_active
from airlock.credentials.tokens import Grant, TokenIssuer, quarantine_path, record_credential
from airlock.db import schema
from airlock.db.engine import is_sqlite, utcnow
from airlock.db.fast import Fast
from airlock.db.schema import file_kind
from airlock.db.transitions import in_states, record_event, transition
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


_T, _J = schema.tasks, schema.jobs
_MINE = aliased(schema.tasks)
_CANDIDATES_QUERY = (
    select(
        _T.c.id,
        _T.c.job_id,
        _J.c.state.label("job_state"),
        cast(_J.c.spec, Text).label("spec_json"),  # decoded only for the candidates leased
        _J.c.app,
        _J.c.cores,
        _J.c.memory_mb,
        _J.c.disk_mb,
        _J.c.deadline_s,
    )
    .join(_J, _J.c.id == _T.c.job_id)
    .where(
        # in the SQL text, not a parameter: a prepared statement's generic plan may then use the
        # partial index ix_tasks_ready
        _T.c.state == literal_column(f"'{TaskState.READY.value}'"),
        in_states(_J.c.state, [JobState.QUEUED.value, JobState.RUNNING.value, JobState.VALIDATING.value]),
        _J.c.cores <= bindparam("cores"),
        _J.c.memory_mb <= bindparam("memory"),
        _J.c.disk_mb <= bindparam("disk"),
        # distinct volunteers: none of the job's tasks is this volunteer's, but for one that gave nothing
        ~exists().where(
            and_(
                _MINE.c.job_id == _T.c.job_id,
                _MINE.c.volunteer_id == bindparam("volunteer"),
                ~in_states(_MINE.c.state, [s.value for s in TASK_NO_RESULT]),
            )
        ),
    )
    .order_by(_T.c.id)  # from ix_tasks_ready: the ready tasks alone (see the schema)
    .limit(bindparam("limit"))
)
_CANDIDATES = Fast(_CANDIDATES_QUERY)
_CANDIDATES_LOCKING = Fast(_CANDIDATES_QUERY.with_for_update(of=_T, skip_locked=True))
_H = schema.hosts
# what dispatch needs of a host (no timestamps: decoding them was a tenth of this statement's cost)
_HOST_AND_OWNER = Fast(
    select(
        _H.c.id,
        _H.c.volunteer_id,
        _H.c.cores,
        _H.c.memory_mb,
        _H.c.disk_mb,
        _H.c.daily_quota,
        _H.c.quota_day,
        _H.c.dispatched_today,
        schema.volunteers.c.state.label("volunteer_state"),
    )
    .join(schema.volunteers, schema.volunteers.c.id == _H.c.volunteer_id)
    .where(_H.c.id == bindparam("host"))
)
_TOUCH_HOST = Fast(
    update(schema.hosts)
    .where(schema.hosts.c.id == bindparam("host"))
    .values(
        last_seen=bindparam("now", type_=schema.hosts.c.last_seen.type),
        quota_day=bindparam("day"),
        dispatched_today=bindparam("used"),
    )
)
_INPUT = Fast(
    select(schema.files.c.sha256, schema.files.c.size, schema.files.c.adler32).where(
        file_kind("input"), schema.files.c.sha256 == bindparam("sha256")
    )
)


def host_row(conn: Connection, host_id: int) -> Any:
    """What dispatch needs of a host (id, volunteer_id, cores, memory_mb, disk_mb, daily_quota,
    quota_day, dispatched_today) with its volunteer's state (`volunteer_state`), or None."""
    return _HOST_AND_OWNER.one_or_none(conn, {"host": host_id})


def own_host(conn: Connection, volunteer_id: int, host_id: int) -> Any:
    """The host row, if it is this (active) volunteer's: one query for both checks."""
    host = host_row(conn, host_id)
    if host is None:
        raise NotFound(f"no host {host_id}")
    if host.volunteer_id != volunteer_id:
        raise Forbidden(f"host {host_id} belongs to another volunteer")
    if host.volunteer_state != VolunteerState.ACTIVE.value:
        raise Forbidden("this volunteer account is blocked")
    return host


@dataclass(frozen=True)
class Lease:
    """A task just leased to a host: what any client protocol needs to hand it out."""

    task_id: int
    job_id: int
    app: str | None
    spec: dict[str, Any]
    leased_at: datetime
    lease_expires_at: datetime
    deadline: datetime


@dataclass(frozen=True)
class Leasing:
    leases: list[Lease]
    refusal: WorkReply | None = None  # why the host may take nothing now (its daily quota)


# An input's size and checksums are functions of its content, named by its digest: once read they hold
# for every database (inputs are never deleted), so a work reply does not look them up again.
_INPUT_DIGESTS: dict[str, Any] = {}
INPUT_DIGESTS_KEPT = 10_000


def _input_digest(conn: Connection, sha256: str) -> Any:
    found = _INPUT_DIGESTS.get(sha256)
    if found is None:
        found = _INPUT.one(conn, {"sha256": sha256})
        if len(_INPUT_DIGESTS) >= INPUT_DIGESTS_KEPT:
            _INPUT_DIGESTS.clear()
        _INPUT_DIGESTS[sha256] = found
    return found


def lease_tasks(
    conn: Connection,
    settings: Settings,
    volunteer_id: int,
    req: WorkRequest,
    *,
    lease_to_deadline: bool = False,
    host: Any = None,
) -> Leasing:
    """Lease up to `req.slots` ready tasks that fit the host, each on a job this volunteer has no task
    of (tasks that gave nothing, `TASK_NO_RESULT`, aside). `lease_to_deadline` is for clients that do
    not heartbeat (BOINC): their lease is the report deadline. `host` is the row `own_host` returns,
    when the caller already fetched it in this transaction."""
    given = host is not None and host.id == req.host_id and host.volunteer_id == volunteer_id
    if not given or host.volunteer_state != VolunteerState.ACTIVE.value:
        host = own_host(conn, volunteer_id, req.host_id)  # fetches and checks (raises if refused)
    now = utcnow()
    allowed = remaining(host.daily_quota, host.cores, host.quota_day, host.dispatched_today, now)
    if allowed <= 0:
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
        conn.execute(update(schema.hosts).where(schema.hosts.c.id == host.id).values(last_seen=now))
        refusal = WorkReply(
            tasks=[],
            retry_after_s=min(int((midnight - now).total_seconds()) + 1, 3600),
            message=f"this host reached its daily quota ({host.daily_quota} per core)",
        )
        return Leasing([], refusal)
    wanted = min(req.slots, allowed)
    cores = min(host.cores, req.free_cores if req.free_cores is not None else host.cores)
    memory = min(host.memory_mb, req.free_memory_mb if req.free_memory_mb is not None else host.memory_mb)
    disk = min(host.disk_mb, req.free_disk_mb if req.free_disk_mb is not None else host.disk_mb)
    query = _CANDIDATES if is_sqlite(conn) else _CANDIDATES_LOCKING
    candidates = query.rows(
        conn,
        {
            "cores": cores,
            "memory": memory,
            "disk": disk,
            "volunteer": volunteer_id,
            "limit": wanted * CANDIDATES_PER_SLOT,
        },
    )
    leases: list[Lease] = []
    jobs_taken: set[int] = set()
    actor = f"host:{host.id}"
    for cand in candidates:
        if len(leases) >= wanted:
            break
        if cand.job_id in jobs_taken or cand.cores > cores or cand.memory_mb > memory or cand.disk_mb > disk:
            continue
        deadline = now + timedelta(seconds=cand.deadline_s)
        lease_expires = min(
            deadline, deadline if lease_to_deadline else now + timedelta(seconds=settings.lease_s)
        )
        if not transition(
            conn,
            TaskState.LEASED,
            cand.id,
            actor,
            values={
                "volunteer_id": volunteer_id,
                "host_id": host.id,
                "leased_at": now,
                "lease_expires_at": lease_expires,
                "deadline": deadline,
            },
            detail={"volunteer_id": volunteer_id},
        ):
            continue  # taken by a concurrent dispatcher
        if cand.job_state == JobState.QUEUED.value:
            transition(conn, JobState.RUNNING, cand.job_id, actor)
        jobs_taken.add(cand.job_id)
        cores, memory, disk = cores - cand.cores, memory - cand.memory_mb, disk - cand.disk_mb
        spec = json.loads(cand.spec_json)
        leases.append(Lease(cand.id, cand.job_id, cand.app, spec, now, lease_expires, deadline))
    used = (host.dispatched_today if host.quota_day == today(now) else 0) + len(leases)
    _TOUCH_HOST.run(conn, {"host": host.id, "now": now, "day": today(now), "used": used})
    return Leasing(leases)


@dataclass(frozen=True)
class Assignment:
    """A lease of the native API with what its reply needs: the upload credential (recorded, not yet
    signed) and its inputs' size and checksums."""

    lease: Lease
    upload: Grant
    inputs: list[tuple[str, Any]]  # (name, the input's digest row)


@dataclass(frozen=True)
class WorkGrant:
    """What a work request's transaction decided. `work_reply` turns it into the reply once it is
    committed: the upload tokens are signed then, outside the transaction (and SQLite's writer turn)."""

    assignments: list[Assignment]
    refusal: WorkReply | None = None


def request_work(
    conn: Connection, settings: Settings, issuer: TokenIssuer, volunteer_id: int, req: WorkRequest
) -> WorkGrant:
    """The native API's work request (the transaction): leases, each with its upload credential
    recorded and its inputs looked up. `work_reply` makes the reply."""
    leasing = lease_tasks(conn, settings, volunteer_id, req)
    if leasing.refusal is not None:
        return WorkGrant([], leasing.refusal)
    return WorkGrant([_assignment(conn, settings, issuer, volunteer_id, lease) for lease in leasing.leases])


def work_reply(settings: Settings, issuer: TokenIssuer, grant: WorkGrant) -> WorkReply:
    """The reply to a committed work request: each task with its inputs' addresses and a signed upload
    token (no database access)."""
    if grant.refusal is not None:
        return grant.refusal
    tasks = [_task_assignment(settings, issuer, a) for a in grant.assignments]
    return WorkReply(
        tasks=tasks,
        retry_after_s=0 if tasks else settings.retry_after_s,
        message=None if tasks else "no work for this host right now",
    )


def grant_upload_token(
    conn: Connection,
    settings: Settings,
    issuer: TokenIssuer,
    volunteer_id: int,
    task_id: int,
    now: datetime,
    deadline: datetime,
) -> Grant:
    """The task's upload credential, recorded (`issuer.sign` makes the token once committed):
    `storage.create` on its own quarantine path only, for `upload_token_ttl_s` at most and never past
    the deadline (heartbeats hand out fresh ones)."""
    ttl = min(deadline - now, timedelta(seconds=settings.upload_token_ttl_s))
    upload = issuer.grant(
        volunteer_id, [f"storage.create:{quarantine_path(volunteer_id, task_id)}"], now, ttl
    )
    record_credential(conn, upload, "upload", volunteer_id, task_id)
    return upload


def _assignment(
    conn: Connection, settings: Settings, issuer: TokenIssuer, volunteer_id: int, lease: Lease
) -> Assignment:
    upload = grant_upload_token(
        conn, settings, issuer, volunteer_id, lease.task_id, lease.leased_at, lease.deadline
    )
    inputs = [(i["name"], _input_digest(conn, i["sha256"])) for i in lease.spec["inputs"]]
    return Assignment(lease, upload, inputs)


def _task_assignment(settings: Settings, issuer: TokenIssuer, assignment: Assignment) -> TaskAssignment:
    lease, spec, base = assignment.lease, assignment.lease.spec, settings.public_url
    path = quarantine_path(assignment.upload.volunteer_id, lease.task_id)
    return TaskAssignment(
        task_id=lease.task_id,
        job_id=lease.job_id,
        app=lease.app,
        command=spec["command"],
        env=spec.get("env") or {},
        inputs=[
            InputRef(
                name=name,
                url=f"{base}/api/v1/inputs/{d.sha256}",
                size=d.size,
                adler32=d.adler32,
                sha256=d.sha256,
            )
            for name, d in assignment.inputs
        ],
        outputs=[
            OutputRef(
                name=o["name"],
                max_size=o["max_size"],
                upload_url=f"{settings.upload_base_url}{path}/{o['name']}",
            )
            for o in spec["outputs"]
        ],
        resources=Resources.model_validate(spec["resources"]),
        lease_expires_at=lease.lease_expires_at,
        deadline=lease.deadline,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        upload_token=issuer.sign(assignment.upload).token,
    )
