"""Replication and reissue: after any task of a job changes, decide what the job needs next.

BOINC's rule, simplified: a job needs `quorum` valid results that agree. When the results in hand and the
tasks still out cannot reach that, new tasks are created, until `max_attempts` tasks were used; then the
job fails. Agreement is what the app's comparator says (equal output digests by default).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from airlock.core.states import JOB_FINAL, JobState, TaskState
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.fast import Fast
from airlock.db.transitions import record_event, transition
from airlock.scheduler.quota import record_outcome

IN_FLIGHT = {TaskState.READY.value, TaskState.LEASED.value, TaskState.REPORTED.value}


_JOB = Fast(
    select(
        schema.jobs.c.state,
        schema.jobs.c.quorum,
        schema.jobs.c.attempts,
        schema.jobs.c.max_attempts,
        schema.jobs.c.canonical_task_id,
    ).where(schema.jobs.c.id == bindparam("id"))
)
_TASKS = Fast(
    select(schema.tasks.c.id, schema.tasks.c.state, schema.tasks.c.agreement, schema.tasks.c.host_id)
    .where(schema.tasks.c.job_id == bindparam("id"))
    .order_by(schema.tasks.c.id)
)


def job_row(conn: Connection, job_id: int) -> Any:
    """What `settle_job` reads of a job: state, quorum, attempts, max_attempts, canonical_task_id."""
    return _JOB.one(conn, {"id": job_id})


def settle_job(
    conn: Connection, job_id: int, actor: str, *, max_quota: int | None = None, job: Any = None
) -> str:
    """Bring a job's state in line with its tasks, in the caller's transaction. Returns the job state.
    `job` is its `job_row`, when the caller read it in this transaction and changed nothing of it since."""
    if job is None:
        job = job_row(conn, job_id)
    if job.state in JOB_FINAL or job.state == JobState.ASSIMILATING.value:
        return str(job.state)
    tasks = _TASKS.rows(conn, {"id": job_id})
    groups: dict[str, list[Any]] = defaultdict(list)
    for task in tasks:
        if task.state == TaskState.VALID.value:
            groups[task.agreement or ""].append(task)
    best = max(groups.values(), key=len, default=[])
    if len(best) >= job.quorum:
        _reach_quorum(conn, job_id, best, groups, list(tasks), actor, max_quota)
        return JobState.ASSIMILATING.value

    in_flight = sum(1 for task in tasks if task.state in IN_FLIGHT)
    missing = job.quorum - len(best) - in_flight
    if missing > 0:
        can_create = min(missing, job.max_attempts - job.attempts)
        if can_create > 0:
            create_tasks(conn, job_id, can_create, actor, reason="replacement")
            in_flight += can_create
        elif not in_flight:
            reason = f"no quorum of {job.quorum} agreeing valid results within {job.max_attempts} attempts"
            transition(
                conn, JobState.FAILED, job_id, actor, values=finish_values(reason), detail={"reason": reason}
            )
            return JobState.FAILED.value
    reported = any(task.state == TaskState.REPORTED.value for task in tasks)
    leased_ever = any(task.state != TaskState.READY.value for task in tasks)
    target = JobState.VALIDATING if reported else (JobState.RUNNING if leased_ever else None)
    if target is not None and job.state != target.value:
        transition(conn, target, job_id, actor)
        return target.value
    return str(job.state)


def settle_reported(conn: Connection, job_id: int, actor: str) -> None:
    """`settle_job` after one of the job's leased tasks was reported, in the same transaction, without
    reading the job and its tasks: a report turns no task valid (so no quorum), leaves the tasks in
    flight as many as they were (LEASED and REPORTED both are), so nothing new is missing, and cannot
    fail the job; all that can change is a running job becoming one that validates. Every other state
    (validating already, assimilating, final) stays as it is: the transition applies only from RUNNING."""
    transition(conn, JobState.VALIDATING, job_id, actor)


def _reach_quorum(
    conn: Connection,
    job_id: int,
    best: list[Any],
    groups: dict[str, list[Any]],
    tasks: list[Any],
    actor: str,
    max_quota: int | None,
) -> None:
    canonical = best[0]
    transition(
        conn,
        JobState.ASSIMILATING,
        job_id,
        actor,
        values={"canonical_task_id": canonical.id, "updated_at": utcnow()},
        detail={"canonical_task": canonical.id, "agreeing": [task.id for task in best]},
    )
    for agreement, group in groups.items():
        if agreement == (canonical.agreement or ""):
            continue
        for task in group:  # valid on its own, but outvoted by the quorum
            outvoted = transition(
                conn, TaskState.INVALID, task.id, actor, values={"verdict": "disagrees with the quorum"}
            )
            if outvoted and max_quota is not None and task.host_id is not None:
                record_outcome(conn, task.host_id, "invalid", max_quota)
    for task in tasks:  # work not yet handed out is no longer needed
        if task.state == TaskState.READY.value:
            transition(conn, TaskState.ABORTED, task.id, actor, detail={"reason": "quorum reached"})


def finish_values(reason: str | None = None) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {"finished_at": now, "updated_at": now}
    if reason is not None:
        values["reason"] = reason
    return values


def create_tasks(conn: Connection, job_id: int, n: int, actor: str, *, reason: str) -> None:
    now = utcnow()
    j = schema.jobs
    conn.execute(update(j).where(j.c.id == job_id).values(attempts=j.c.attempts + n, updated_at=now))
    ids = conn.execute(
        insert(schema.tasks).returning(schema.tasks.c.id, sort_by_parameter_order=True),
        [{"job_id": job_id, "state": TaskState.READY.value, "created_at": now} for _ in range(n)],
    ).scalars()
    for tid in ids:
        record_event(conn, actor, "task.created", "task", tid, {"job_id": job_id, "reason": reason})


def cancel_job(conn: Connection, job_id: int, actor: str, reason: str = "cancelled by the operator") -> bool:
    """Cancel a job and abort its unfinished tasks (an agent learns of it at its next heartbeat)."""
    if not transition(conn, JobState.CANCELLED, job_id, actor, values=finish_values(reason)):
        return False
    t = schema.tasks
    for (tid,) in conn.execute(select(t.c.id).where(t.c.job_id == job_id, t.c.state.in_(IN_FLIGHT))).all():
        transition(conn, TaskState.ABORTED, tid, actor, detail={"reason": "job cancelled"})
    return True


def cancel_batch(conn: Connection, batch_id: int, actor: str) -> int:
    """Cancel every unfinished job of a batch; returns how many were cancelled."""
    j = schema.jobs
    unfinished = conn.execute(
        select(j.c.id).where(j.c.batch_id == batch_id, j.c.state.not_in([s.value for s in JOB_FINAL]))
    ).scalars()
    return sum(cancel_job(conn, job_id, actor) for job_id in list(unfinished))


def revoke_result(
    conn: Connection, task_id: int, actor: str, reason: str, *, max_quota: int | None = None
) -> bool:
    """Withdraw a result the validator accepted or has yet to judge (its volunteer was blocked, or its
    quarantined bytes no longer match): the task becomes invalid and, if it was the job's canonical result
    still waiting to be assimilated, the job goes back to collecting results. Replication then reissues."""
    t, j = schema.tasks, schema.jobs
    task = conn.execute(select(t.c.job_id, t.c.host_id).where(t.c.id == task_id)).one()
    if not transition(
        conn,
        TaskState.INVALID,
        task_id,
        actor,
        values={"verdict": reason},
        detail={"reason": reason},
        only_from=frozenset({TaskState.REPORTED, TaskState.VALID}),
    ):
        return False
    if max_quota is not None and task.host_id is not None:
        record_outcome(conn, task.host_id, "invalid", max_quota)
    job = conn.execute(select(j.c.state, j.c.canonical_task_id).where(j.c.id == task.job_id)).one()
    if job.state == JobState.ASSIMILATING.value and job.canonical_task_id == task_id:
        transition(
            conn,
            JobState.RUNNING,
            task.job_id,
            actor,
            values={"canonical_task_id": None, "updated_at": utcnow()},
            detail={"reason": f"canonical result {task_id} revoked: {reason}"},
        )
    settle_job(conn, task.job_id, actor, max_quota=max_quota)
    return True
