"""Judge reported tasks: each verdict is one transaction that also updates the host's record and
lets replication decide what the job needs next.

Checks, in order: exit code; every declared output uploaded; the volunteer's reported checksums equal
what the bridge received; the quarantined bytes still match (size, adler32, sha256); archive safety; the
app's own check. A task that passes is valid with the app's agreement fingerprint; the quorum decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select

from airlock.config import Settings
from airlock.core.states import JobState, TaskState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.transitions import transition
from airlock.scheduler.quota import record_outcome
from airlock.scheduler.replication import settle_job
from airlock.storage.base import Storage
from airlock.validator.apps import InvalidResult, Output, validator_for
from airlock.validator.archive import check_archive, is_archive

log = logging.getLogger("airlock.validator")
ACTOR = "system:validator"


@dataclass(frozen=True)
class Verdict:
    state: TaskState  # VALID, INVALID or ERROR
    reason: str
    agreement: str | None = None


def judge(task: Any, job: Any, outputs: list[Any], quarantine: Storage, settings: Settings) -> Verdict:
    """Decide one task. Pure apart from reading the quarantined files."""
    if task.exit_code != 0:
        return Verdict(TaskState.ERROR, f"exit code {task.exit_code}")
    spec = job.spec
    by_name = {f.name: f for f in outputs}
    reported = {o["name"]: o for o in (task.reported_outputs or [])}
    checked: dict[str, Output] = {}
    try:
        for declared in spec["outputs"]:
            name = declared["name"]
            f = by_name.get(name)
            if f is None:
                raise InvalidResult(f"declared output {name} was never uploaded")
            claim = reported.get(name)
            if claim is None:
                raise InvalidResult(f"the report does not list output {name}")
            if (claim["size"], claim["adler32"], claim["sha256"]) != (f.size, f.adler32, f.sha256):
                raise InvalidResult(f"{name}: the reported checksums differ from the uploaded file's")
            have = quarantine.stat(f.location)
            if have is None:
                raise InvalidResult(f"{name}: the quarantined file is missing")
            if (have.size, have.adler32, have.sha256) != (f.size, f.adler32, f.sha256):
                raise InvalidResult(f"{name}: the quarantined file no longer matches its checksums")
            path = quarantine.local_path(f.location)
            if path is None:
                raise InvalidResult(f"{name}: remote quarantine is not readable by this validator")
            if is_archive(name):
                check_archive(name, path, settings.max_archive_unpacked)
            checked[name] = Output(name, path, f.size, f.sha256)
        app = validator_for(job.app)
        app.check(spec.get("params") or {}, checked)
        agreement = app.fingerprint(spec.get("params") or {}, checked)
    except InvalidResult as exc:
        return Verdict(TaskState.INVALID, str(exc))
    return Verdict(TaskState.VALID, "passed all checks", agreement)


def _apply(conn: Connection, task: Any, job: Any, verdict: Verdict, settings: Settings) -> bool:
    state, reason = verdict.state, verdict.reason
    if state == TaskState.VALID and job.state in (JobState.ASSIMILATING.value, JobState.DONE.value):
        # late result of a job that already has its canonical result: valid only if it agrees
        canonical = conn.execute(
            select(schema.tasks.c.agreement).where(schema.tasks.c.id == job.canonical_task_id)
        ).scalar_one_or_none()
        if canonical != verdict.agreement:
            state, reason = TaskState.INVALID, "disagrees with the canonical result"
    if not transition(
        conn,
        state,
        task.id,
        ACTOR,
        only_from=frozenset({TaskState.REPORTED}),
        values={"verdict": reason, "agreement": verdict.agreement, "validated_at": utcnow()},
        detail={"reason": reason},
    ):
        return False  # another validator got there first
    if task.host_id is not None:
        record_outcome(conn, task.host_id, state.value, settings.daily_quota_per_core)
    settle_job(conn, task.job_id, ACTOR, max_quota=settings.daily_quota_per_core)
    return True


def validate_pending(engine: Engine, quarantine: Storage, settings: Settings, *, limit: int = 200) -> int:
    """Judge up to `limit` reported tasks; returns how many verdicts were recorded."""
    t, j, f = schema.tasks, schema.jobs, schema.files
    with read(engine) as conn:
        rows = conn.execute(
            select(t).where(t.c.state == TaskState.REPORTED.value).order_by(t.c.id).limit(limit)
        ).all()
        jobs = (
            {r.id: r for r in conn.execute(select(j).where(j.c.id.in_({r.job_id for r in rows})))}
            if rows
            else {}
        )
        files: dict[int, list[Any]] = {}
        if rows:
            for frow in conn.execute(
                select(f).where(f.c.kind == "output", f.c.task_id.in_([r.id for r in rows]))
            ):
                files.setdefault(frow.task_id, []).append(frow)
    n = 0
    for task in rows:
        job = jobs[task.job_id]
        try:
            verdict = judge(task, job, files.get(task.id, []), quarantine, settings)
        except Exception:  # a bug of ours, not the volunteer's fault: leave the task for a retry
            log.exception("validator failed on task %s; will retry", task.id)
            continue
        with engine.begin() as conn:
            current = conn.execute(select(j).where(j.c.id == task.job_id)).one()
            if _apply(conn, task, current, verdict, settings):
                n += 1
                log.info("task %s: %s (%s)", task.id, verdict.state.value, verdict.reason)
    return n
