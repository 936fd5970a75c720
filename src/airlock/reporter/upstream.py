"""Operator read model of upstream jobs: each DIRAC job next to its Airlock job, and the reconciliation
with the upstream (for `airlock status --upstream`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, func, select

from airlock.core.states import UpstreamJobState
from airlock.db import schema
from airlock.upstream.base import OutputFile, UpstreamError, UpstreamJob


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


class UpstreamView(Protocol):
    """What the reconciliation asks of the upstream (`airlock.upstream.dirac.DiracUpstream` has it)."""

    def job_state(self, ref: str) -> tuple[str | None, str | None]: ...

    def output_registered(self, job: UpstreamJob, output: OutputFile) -> bool: ...


@dataclass
class UpstreamDrift:
    """Where the upstream and Airlock disagree about finished jobs (each entry names the job and why)."""

    done_without_files: list[str] = field(default_factory=list)  # Done upstream, an output not there
    files_without_done: list[str] = field(default_factory=list)  # outputs registered, job not Done
    unreachable: list[str] = field(default_factory=list)  # the upstream could not be asked

    @property
    def drift(self) -> bool:
        return bool(self.done_without_files or self.files_without_done)


def reconcile_upstream(conn: Connection, upstream: str, view: UpstreamView) -> UpstreamDrift:
    """Ask the upstream, for each job the gateway handed back or registered files of (the latest attempt
    per upstream id), whether it is Done and whether its outputs are registered, and flag: a job Done
    upstream without all its files, and files registered for a job that is not Done upstream."""
    u = schema.upstream_jobs
    latest = (
        select(u.c.ref, func.max(u.c.attempt).label("attempt"))
        .where(u.c.upstream == upstream)
        .group_by(u.c.ref)
    ).subquery()
    rows = conn.execute(
        select(u.c.ref, u.c.state, u.c.registered, u.c.description)
        .join(latest, (latest.c.ref == u.c.ref) & (latest.c.attempt == u.c.attempt))
        .where(u.c.upstream == upstream)
        .order_by(u.c.id)
    )
    out = UpstreamDrift()
    for row in rows:
        registered = list(row.registered or [])
        if row.state != UpstreamJobState.DONE.value and not registered:
            continue  # nothing handed back yet: nothing to disagree on
        job = UpstreamJob.from_json(row.description)
        try:
            status, _minor = view.job_state(row.ref)
            missing = [o.lfn for o in job.output_data if not view.output_registered(job, o)]
        except UpstreamError as exc:
            out.unreachable.append(f"{row.ref}: {exc}")
            continue
        if status == "Done" and missing:
            out.done_without_files.append(f"{row.ref}: Done upstream, not registered: {', '.join(missing)}")
        elif status != "Done" and (registered or row.state == UpstreamJobState.DONE.value):
            files = ", ".join(registered) or "its outputs"
            out.files_without_done.append(f"{row.ref}: {status} upstream, yet {files} handed back")
    return out
