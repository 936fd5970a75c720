"""Operator read model of upstream jobs: each DIRAC job next to its Airlock job (for `airlock status`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from airlock.db import schema


def upstream_jobs(conn: Connection, *, limit: int = 200) -> list[dict[str, Any]]:
    """The latest upstream jobs: upstream id and attempt, the gateway's progress with it, the status the
    upstream last took from the gateway, and the Airlock job's state and tasks."""
    u, j, t = schema.upstream_jobs, schema.jobs, schema.tasks
    n_tasks = (
        select(func.count()).select_from(t).where(t.c.job_id == u.c.job_id).scalar_subquery().label("tasks")
    )
    rows = conn.execute(
        select(
            u.c.upstream,
            u.c.ref,
            u.c.attempt,
            u.c.state,
            u.c.reported,
            u.c.error,
            u.c.job_id,
            j.c.state.label("job_state"),
            n_tasks,
        )
        .select_from(u.outerjoin(j, j.c.id == u.c.job_id))
        .order_by(u.c.id.desc())
        .limit(limit)
    )
    out = []
    for r in rows:
        status, minor = "", ""
        if r.reported:
            status, _, rest = r.reported.partition("|")
            minor = rest.partition("|")[0]
        out.append({**r._mapping, "reported_status": status, "reported_minor": minor})
    return out
