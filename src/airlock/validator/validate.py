"""Judge reported tasks: each verdict is one transaction that also updates the host's record and
lets replication decide what the job needs next.

Checks, in order: exit code; every declared output uploaded; the volunteer's reported checksums equal
what the bridge received; the quarantined bytes still match (size, adler32, sha256); archive safety; the
app's own check. A task that passes is valid with the app's agreement fingerprint; the quorum decides.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select

from airlock.bridge.quarantine import UploadTarget, record_upload, remote_output_key, remote_task_folder
from airlock.config import Settings
from airlock.core.checksums import Digest
from airlock.core.states import JobState, TaskState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.fast import Fast, savepoint
from airlock.db.schema import file_kind
from airlock.db.transitions import record_event, transition
from airlock.scheduler.quota import record_outcome
from airlock.scheduler.replication import job_row, settle_job
from airlock.storage.base import DigestMismatch, Storage
from airlock.storage.xrootd import XRootDStorage
from airlock.validator.apps import InvalidResult, Output, validator_for
from airlock.validator.archive import check_archive, is_archive

log = logging.getLogger("airlock.validator")
ACTOR = "system:validator"


@dataclass(frozen=True)
class Verdict:
    state: TaskState  # VALID, INVALID or ERROR
    reason: str
    agreement: str | None = None


# Verdicts per write transaction (one writer turn). The serving processes commit a group of requests a
# turn, and turns go round the processes in about equal shares: with 10 verdicts a turn and two serving
# workers the loops judged and assimilated jobs at 27-29 % of the rate they were dispatched, with 50 (and
# the assimilator's 100) at 90-93 %. A turn holds the lock a few ms longer; the p99 of a cycle was 156-239
# ms either way.
BATCH = 50

_AGREEMENT = Fast(select(schema.tasks.c.agreement).where(schema.tasks.c.id == bindparam("id")))


def judge(
    task: Any,
    job: Any,
    outputs: list[Any],
    quarantine: Storage,
    settings: Settings,
    fetched: dict[str, tuple[Digest, Path]] | None = None,
) -> Verdict:
    """Decide one task. Pure apart from reading the quarantined files. `fetched` holds local copies of a
    remote quarantine's files (see `fetch_remote_outputs`); None for a local quarantine."""
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
            if f.size > int(declared["max_size"]):
                raise InvalidResult(f"{name}: {f.size} bytes, more than the declared {declared['max_size']}")
            if (claim["size"], claim["adler32"], claim["sha256"]) != (f.size, f.adler32, f.sha256):
                raise InvalidResult(f"{name}: the reported checksums differ from the uploaded file's")
            if fetched is None:
                have, path = quarantine.stat(f.location), quarantine.local_path(f.location)
            else:
                have, path = fetched.get(name, (None, None))
            if have is None or path is None:
                raise InvalidResult(f"{name}: the quarantined file is missing")
            if (have.size, have.adler32, have.sha256) != (f.size, f.adler32, f.sha256):
                raise InvalidResult(f"{name}: the quarantined file no longer matches its checksums")
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
        canonical = _AGREEMENT.scalar(conn, {"id": job.canonical_task_id})
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
    # the job row read in this transaction is still current: a verdict changes only its task and host
    settle_job(conn, task.job_id, ACTOR, max_quota=settings.daily_quota_per_core, job=job)
    return True


def fetch_remote_outputs(
    engine: Engine, quarantine: XRootDStorage, task: Any, job: Any, recorded: list[Any], workdir: Path
) -> tuple[list[Any], dict[str, tuple[Digest, Path]]]:
    """Volunteers upload straight to a remote quarantine, so the gateway learns of a file here: each
    declared output found on the server is recorded (attributed to the task's volunteer and host, checksums
    measured, never the volunteer's word) and copied to `workdir` for the checks that need its bytes.

    A file larger than declared, or whose server adler32 and size already differ from the report, is
    recorded but not downloaded (its sha256 stays unknown, ""): it is invalid whatever its bytes."""
    by_name = {f.name: f for f in recorded}
    reported = {o["name"]: o for o in (task.reported_outputs or [])}
    fetched: dict[str, tuple[Digest, Path]] = {}
    new = False
    for declared in job.spec["outputs"]:
        name, max_size = declared["name"], int(declared["max_size"])
        key = remote_output_key(task.volunteer_id, task.id, name)
        server = quarantine.checksum(key)
        if server is None:
            continue
        claim = reported.get(name)
        digest = Digest(server[0], server[1], "")
        if server[0] <= max_size and claim is not None and (claim["size"], claim["adler32"]) == server:
            local = workdir / name
            try:
                digest = quarantine.download(key, local)
            except DigestMismatch:
                continue  # changed while we read it: judged missing now, checked again on the next pass
            fetched[name] = (digest, local)
        if name not in by_name:
            target = UploadTarget(
                task.volunteer_id, task.id, name, task.job_id, task.host_id, max_size, remote=True
            )
            with engine.begin() as conn:
                new |= record_upload(conn, target, digest, None)
    _remove_undeclared(engine, quarantine, task, {d["name"] for d in job.spec["outputs"]})
    if new:
        with read(engine) as conn:
            recorded = list(
                conn.execute(
                    select(schema.files).where(file_kind("output"), schema.files.c.task_id == task.id)
                )
            )
    return recorded, fetched


def _remove_undeclared(engine: Engine, quarantine: XRootDStorage, task: Any, declared: set[str]) -> None:
    """A `storage.create` token cannot restrict names: delete files the job did not ask for (on record)."""
    folder = remote_task_folder(task.volunteer_id, task.id)
    for key in quarantine.list(folder):
        name = key.rsplit("/", 1)[-1]
        if name in declared:
            continue
        quarantine.delete(key)
        log.warning("task %s: removed undeclared upload %s", task.id, key)
        with engine.begin() as conn:
            record_event(conn, ACTOR, "file.undeclared_removed", "task", task.id, {"key": key})


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
                select(f).where(file_kind("output"), f.c.task_id.in_([r.id for r in rows]))
            ):
                files.setdefault(frow.task_id, []).append(frow)
    verdicts: list[tuple[Any, Verdict]] = []
    for task in rows:
        job = jobs[task.job_id]
        try:
            outputs = files.get(task.id, [])
            if isinstance(quarantine, XRootDStorage):  # local copies to check, in a folder of their own
                with tempfile.TemporaryDirectory(prefix="airlock-validate-") as workdir:
                    outputs, fetched = fetch_remote_outputs(
                        engine, quarantine, task, job, outputs, Path(workdir)
                    )
                    verdict = judge(task, job, outputs, quarantine, settings, fetched)
            else:  # a local quarantine is read in place
                verdict = judge(task, job, outputs, quarantine, settings)
        except Exception:  # a bug of ours, not the volunteer's fault: leave the task for a retry
            log.exception("validator failed on task %s; will retry", task.id)
            continue
        verdicts.append((task, verdict))
    n = 0
    # Verdicts are recorded BATCH at a time in one transaction (each in a savepoint of its own, so one
    # failure leaves the others): fewer commits, and the writer lock is never held for long. They are
    # logged once committed, outside the transaction.
    for i in range(0, len(verdicts), BATCH):
        recorded: list[tuple[Any, Verdict]] = []
        with engine.begin() as conn:
            for task, verdict in verdicts[i : i + BATCH]:
                try:
                    with savepoint(conn):  # what recording it needs of its job, read again in here
                        current = job_row(conn, task.job_id)
                        applied = _apply(conn, task, current, verdict, settings)
                except Exception:
                    log.exception("recording the verdict on task %s failed; will retry", task.id)
                    continue
                if applied:
                    recorded.append((task, verdict))
        n += len(recorded)
        _log_verdicts(recorded)
    return n


def _log_verdicts(recorded: list[tuple[Any, Verdict]]) -> None:
    """One line for the valid results of a transaction (at a few hundred verdicts a second, a line each
    cost the validator a tenth of its time), and one for every other verdict, with its reason. Every
    verdict is also an audit event of its task."""
    valid = [task.id for task, verdict in recorded if verdict.state == TaskState.VALID]
    if valid:
        log.info("tasks valid: %s", ", ".join(map(str, valid)))
    for task, verdict in recorded:
        if verdict.state != TaskState.VALID:
            log.info("task %s: %s (%s)", task.id, verdict.state.value, verdict.reason)
