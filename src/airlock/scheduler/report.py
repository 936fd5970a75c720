"""A volunteer reports a task's result: accepted once, from the host that holds the live lease."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select

from airlock.core.errors import BadInput, Conflict, Forbidden, Gone
from airlock.core.schemas import ReportAccepted, TaskReport
from airlock.core.states import TaskState
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.fast import Fast
from airlock.db.transitions import transition
from airlock.scheduler.leases import active_volunteers_task, lease_is_live
from airlock.scheduler.replication import settle_reported

_DONE = {TaskState.REPORTED.value, TaskState.VALID.value, TaskState.INVALID.value, TaskState.ERROR.value}


_JOB_SPEC = Fast(select(schema.jobs.c.spec).where(schema.jobs.c.id == bindparam("id")))


def report_task(
    conn: Connection, volunteer_id: int, task_id: int, report: TaskReport, *, task: Any = None
) -> ReportAccepted:
    """Record the report. Every refusal is raised before the first write, so a caller reporting several
    tasks in one transaction (the BOINC scheduler) needs no savepoint around each. `task` is the row
    `own_task` returns, when the caller already fetched it in this transaction after checking that the
    volunteer is active (the BOINC scheduler does both for the whole RPC)."""
    if task is None:
        task = active_volunteers_task(conn, volunteer_id, report.host_id, task_id, with_spec=True)
        spec = task.spec
    elif (task.id, task.volunteer_id, task.host_id) != (task_id, volunteer_id, report.host_id):
        raise Forbidden(f"task {task_id} is not assigned to this host")
    else:
        spec = None
    now = utcnow()
    if task.state in _DONE:
        raise Conflict(f"task {task_id} was already reported")
    if task.state == TaskState.ABORTED.value:
        raise Gone(f"task {task_id} was aborted (its job was cancelled or finished)")
    if not lease_is_live(task, now):
        raise Gone(f"the lease on task {task_id} has expired; the task was given to another host")
    if spec is None:
        spec = _JOB_SPEC.one(conn, {"id": task.job_id}).spec
    declared = {o["name"] for o in spec["outputs"]}
    names = [o.name for o in report.outputs]
    unknown = sorted(set(names) - declared)
    if unknown:
        raise BadInput(f"task {task_id} reports outputs the job did not declare: {unknown}")
    if len(names) != len(set(names)):
        raise BadInput("an output is reported twice")
    actor = f"host:{report.host_id}"
    transition(
        conn,
        TaskState.REPORTED,
        task_id,
        actor,
        only_from=frozenset({TaskState.LEASED}),
        values={
            "reported_at": now,
            "exit_code": report.exit_code,
            "cpu_time_s": report.cpu_time_s,
            "wall_time_s": report.wall_time_s,
            "stderr_tail": report.stderr_tail[-65536:],
            "reported_outputs": [o.model_dump() for o in report.outputs],
        },
        detail={"exit_code": report.exit_code},
    )
    settle_reported(conn, task.job_id, actor)
    return ReportAccepted(task_id=task_id, state=TaskState.REPORTED.value)
