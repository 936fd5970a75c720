"""Leases: heartbeats keep a task's lease; the expiry loop turns overdue tasks into lost ones."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, or_, select, update

from airlock.config import Settings
from airlock.core.errors import Forbidden, Gone, NotFound
from airlock.core.schemas import HeartbeatReply
from airlock.core.states import TaskState
from airlock.credentials.accounts import check_active
from airlock.credentials.tokens import Grant, TokenIssuer
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.fast import Fast
from airlock.db.transitions import transition
from airlock.scheduler.dispatch import grant_upload_token
from airlock.scheduler.quota import record_outcome
from airlock.scheduler.replication import settle_job

log = logging.getLogger("airlock.scheduler")

_T = schema.tasks
# what deciding on a task's lease reads of it (`own_task`, `lease_is_live`)
LEASE_COLUMNS = (
    _T.c.id,
    _T.c.job_id,
    _T.c.state,
    _T.c.volunteer_id,
    _T.c.host_id,
    _T.c.lease_expires_at,
    _T.c.deadline,
)
_TASK = Fast(select(*LEASE_COLUMNS).where(_T.c.id == bindparam("id")))


def own_task(conn: Connection, volunteer_id: int, host_id: int, task_id: int) -> Any:
    """The task row if this volunteer's host holds it; Forbidden for anyone else's task."""
    return _held_by(_TASK.one_or_none(conn, {"id": task_id}), volunteer_id, host_id, task_id)


def _held_by(task: Any, volunteer_id: int, host_id: int, task_id: int) -> Any:
    """`task` (a row with LEASE_COLUMNS, or None if there is no such task) if this volunteer's host
    holds it; NotFound or Forbidden otherwise."""
    if task is None or task.id is None:
        raise NotFound(f"no task {task_id}")
    if task.volunteer_id != volunteer_id:
        raise Forbidden(f"task {task_id} is not assigned to you")
    if task.host_id != host_id:
        raise Forbidden(f"task {task_id} is assigned to another of your hosts")
    return task


_V, _J = schema.volunteers, schema.jobs


def _volunteer_and_task(*extra: Any) -> Fast:
    """The volunteer's state and the task (with `extra` columns of its job): one statement for what
    `require_active` and `own_task` read in two."""
    return Fast(
        select(_V.c.state.label("volunteer_state"), *LEASE_COLUMNS, *extra)
        .select_from(_V.outerjoin(_T, _T.c.id == bindparam("task")).outerjoin(_J, _J.c.id == _T.c.job_id))
        .where(_V.c.id == bindparam("volunteer"))
    )


_VOLUNTEER_AND_TASK = {False: _volunteer_and_task(), True: _volunteer_and_task(_J.c.spec)}


def active_volunteers_task(
    conn: Connection, volunteer_id: int, host_id: int, task_id: int, *, with_spec: bool = False
) -> Any:
    """`require_active` then `own_task`, in one statement, with the same refusals in the same order;
    `with_spec`: the row carries its job's spec too."""
    row = _VOLUNTEER_AND_TASK[with_spec].one_or_none(conn, {"volunteer": volunteer_id, "task": task_id})
    check_active(row.volunteer_state if row is not None else None)
    return _held_by(row, volunteer_id, host_id, task_id)  # (no task: its columns are all NULL)


_RENEW_LEASE = Fast(
    update(_T)
    .where(_T.c.id == bindparam("id"))
    .values(lease_expires_at=bindparam("expires", type_=_T.c.lease_expires_at.type))
)
_HOST_SEEN = Fast(
    update(schema.hosts)
    .where(schema.hosts.c.id == bindparam("host"))
    .values(last_seen=bindparam("now", type_=schema.hosts.c.last_seen.type))
)


def lease_is_live(task: Any, now: Any) -> bool:
    return bool(task.state == TaskState.LEASED.value and task.lease_expires_at > now and task.deadline > now)


@dataclass(frozen=True)
class Renewal:
    """What a heartbeat's transaction decided; `heartbeat_reply` makes the reply once it is committed
    (a fresh upload token is signed then, outside the transaction)."""

    lease_expires_at: datetime
    abort: bool
    upload: Grant | None = None


def heartbeat(
    conn: Connection,
    settings: Settings,
    volunteer_id: int,
    host_id: int,
    task_id: int,
    issuer: TokenIssuer | None = None,
) -> Renewal:
    """Renew the lease (never past the deadline) and, given the issuer, grant a fresh upload token:
    upload tokens live minutes, so a long task uploads with the one from its latest heartbeat."""
    task = active_volunteers_task(conn, volunteer_id, host_id, task_id)
    now = utcnow()
    if task.state == TaskState.ABORTED.value:
        return Renewal(now, abort=True)
    if not lease_is_live(task, now):
        raise Gone(f"task {task_id} is no longer leased to this host ({task.state}); drop it")
    new_expiry = min(now + timedelta(seconds=settings.lease_s), task.deadline)
    _RENEW_LEASE.run(conn, {"id": task_id, "expires": new_expiry})
    _HOST_SEEN.run(conn, {"host": host_id, "now": now})
    upload = (
        None
        if issuer is None
        else grant_upload_token(conn, settings, issuer, volunteer_id, task_id, now, task.deadline)
    )
    return Renewal(new_expiry, abort=False, upload=upload)


def heartbeat_reply(issuer: TokenIssuer, renewal: Renewal) -> HeartbeatReply:
    """The reply to a committed heartbeat, with the fresh upload token signed."""
    return HeartbeatReply(
        lease_expires_at=renewal.lease_expires_at,
        abort=renewal.abort,
        upload_token=issuer.sign(renewal.upload).token if renewal.upload is not None else None,
    )


def expire_leases(engine: Engine, settings: Settings, *, limit: int = 500) -> int:
    """Mark overdue leased tasks lost (each in its own transaction) and let replication reissue them."""
    t = schema.tasks
    now = utcnow()
    with read(engine) as conn:
        overdue = (
            conn.execute(
                select(t.c.id)
                .where(
                    t.c.state == TaskState.LEASED.value, or_(t.c.lease_expires_at <= now, t.c.deadline <= now)
                )
                .order_by(t.c.id)
                .limit(limit)
            )
            .scalars()
            .all()
        )
    n = 0
    for task_id in overdue:
        with engine.begin() as conn:
            row = conn.execute(
                select(t.c.job_id, t.c.host_id, t.c.lease_expires_at, t.c.deadline).where(t.c.id == task_id)
            ).one()
            reason = "deadline passed" if row.deadline <= now else "lease not renewed"
            if transition(
                conn,
                TaskState.LOST,
                task_id,
                "system:expiry",
                only_from=frozenset({TaskState.LEASED}),
                detail={"reason": reason},
            ):
                if row.host_id is not None:
                    record_outcome(conn, row.host_id, "lost", settings.daily_quota_per_core)
                settle_job(conn, row.job_id, "system:expiry", max_quota=settings.daily_quota_per_core)
                n += 1
                log.info("task %d of job %d (host %s): %s; lost", task_id, row.job_id, row.host_id, reason)
    return n
