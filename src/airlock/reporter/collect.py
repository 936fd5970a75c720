"""Read-only queries behind the report: return times, success per host, task outcomes, physics files."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select

from airlock.core.states import TASK_FINAL, JobState, TaskState
from airlock.db.schema import batches, file_kind, files, hosts, jobs, tasks, volunteers
from airlock.reporter.model import HostRow, Outcomes, Reason, ReturnTimes

FINAL_TASK_STATES = [s.value for s in TaskState if s in TASK_FINAL]
# the states a host is accountable for; an abort is the server's decision
HOST_ACCOUNTABLE = (TaskState.VALID, TaskState.INVALID, TaskState.ERROR, TaskState.LOST)
TOP_REASONS = 10
REASON_CHARS = 160
LBMC_APP = "lbmc"
LBMC_OUTPUT = "events.root"


def time_to_fraction(times_s: list[float], jobs_total: int, fraction: float) -> float | None:
    """Seconds until `fraction` of the batch's jobs had returned (times sorted); None if never reached."""
    need = max(1, math.ceil(fraction * jobs_total - 1e-9))
    return times_s[need - 1] if len(times_s) >= need else None


def return_times(conn: Connection, *, batch_id: int | None = None) -> list[ReturnTimes]:
    q = select(batches.c.id, batches.c.name, batches.c.created_at).order_by(batches.c.id)
    if batch_id is not None:
        q = q.where(batches.c.id == batch_id)
    out: list[ReturnTimes] = []
    for batch in conn.execute(q):
        job_rows = list(
            conn.execute(select(jobs.c.state, jobs.c.finished_at).where(jobs.c.batch_id == batch.id))
        )
        created: datetime = batch.created_at
        times = sorted(
            max(0.0, (r.finished_at - created).total_seconds())
            for r in job_rows
            if r.state == JobState.DONE and r.finished_at is not None
        )
        n = len(job_rows)
        out.append(
            ReturnTimes(
                batch_id=batch.id,
                batch_name=batch.name,
                created_at=created,
                jobs=n,
                done=len(times),
                times_s=times,
                first_s=times[0] if times else None,
                p50_s=time_to_fraction(times, n, 0.5),
                p90_s=time_to_fraction(times, n, 0.9),
                p100_s=time_to_fraction(times, n, 1.0) if n else None,
            )
        )
    return out


def _scoped(q: Select[Any], batch_id: int | None) -> Select[Any]:
    """Restrict a query on tasks to the tasks of one batch's jobs."""
    if batch_id is None:
        return q
    return q.join(jobs, jobs.c.id == tasks.c.job_id).where(jobs.c.batch_id == batch_id)


def host_rows(conn: Connection, *, batch_id: int | None = None) -> list[HostRow]:
    """Every host (only those with tasks in the batch, when one is given) with its tasks by final state."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    q = select(tasks.c.host_id, tasks.c.state, func.count()).where(tasks.c.host_id.is_not(None))
    for host_id, state, n in conn.execute(_scoped(q, batch_id).group_by(tasks.c.host_id, tasks.c.state)):
        counts[host_id][state] += n
    hq = (
        select(hosts, volunteers.c.name.label("volunteer"))
        .join(volunteers, volunteers.c.id == hosts.c.volunteer_id)
        .order_by(hosts.c.id)
    )
    rows: list[HostRow] = []
    for h in conn.execute(hq):
        if batch_id is not None and h.id not in counts:
            continue
        c = counts[h.id]
        accountable = sum(c[s] for s in HOST_ACCOUNTABLE)
        rows.append(
            HostRow(
                host_id=h.id,
                host_name=h.name,
                volunteer=h.volunteer,
                platform=h.platform,
                cores=h.cores,
                daily_quota=h.daily_quota,
                tasks={s: c[s] for s in FINAL_TASK_STATES},
                in_progress=sum(n for s, n in c.items() if s not in FINAL_TASK_STATES),
                success_rate=c[TaskState.VALID] / accountable if accountable else None,
            )
        )
    return rows


def _reason(verdict: str | None, exit_code: int | None) -> str:
    text = (verdict or "").strip().splitlines()
    if text:
        first = text[0].strip()
        return first if len(first) <= REASON_CHARS else first[: REASON_CHARS - 1] + "…"
    return f"exit code {exit_code}" if exit_code is not None else "(no verdict)"


def outcomes(conn: Connection, *, batch_id: int | None = None) -> Outcomes:
    totals: Counter[str] = Counter()
    q = select(tasks.c.state, func.count())
    for state, n in conn.execute(_scoped(q, batch_id).group_by(tasks.c.state)):
        totals[state] += n
    rq = select(tasks.c.state, tasks.c.verdict, tasks.c.exit_code).where(
        tasks.c.state.in_([TaskState.INVALID.value, TaskState.ERROR.value])
    )
    reasons: Counter[tuple[str, str]] = Counter(
        (r.state, _reason(r.verdict, r.exit_code)) for r in conn.execute(_scoped(rq, batch_id))
    )
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]
    all_states = [s.value for s in TaskState] + sorted(s for s in totals if s not in set(TaskState))
    return Outcomes(
        tasks={s: totals[s] for s in all_states},
        reasons=[Reason(state, reason, n) for (state, reason), n in ranked],
    )


def physics_files(conn: Connection, *, batch_id: int | None = None) -> list[str]:
    """Trusted keys of the events.root files of done lbmc jobs."""
    q = (
        select(files.c.location)
        .join(jobs, jobs.c.id == files.c.job_id)
        .where(
            file_kind("trusted"),
            files.c.name == LBMC_OUTPUT,
            jobs.c.app == LBMC_APP,
            jobs.c.state == JobState.DONE.value,
        )
        .order_by(files.c.id)
    )
    if batch_id is not None:
        q = q.where(jobs.c.batch_id == batch_id)
    return [r.location for r in conn.execute(q)]
