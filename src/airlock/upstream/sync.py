"""The gateway side of an upstream: the Job Generator and the upstream half of the Job Assimilator.

Three steps, each a background loop (``airlock.service``) when ``upstream = "dirac"``:

``generate``  fetch (match) jobs while fewer than ``dirac_max_queued`` wait for a volunteer; record each
              one at once (``upstream_jobs``, state ``matched``) so a crash never loses a matched job;
              refuse what Airlock cannot run (upstream status Failed, minor ``Airlock: <reason>``),
              including inputs too large for volunteers' links, from the sizes the upstream gives
              BEFORE any download (and again from the downloaded bytes, as a backstop);
              download its inputs ONCE into the content-addressed input cache; create a batch of one
              job (``batches.upstream``/``upstream_ref``) and mark the row ``accepted`` in the same
              transaction.
``monitor``   for each accepted job still in flight: heartbeat (a ``Kill`` cancels the Airlock job the
              way the operator does, aborting its volunteer tasks), and report the state it is in
              (Running while it waits or runs, Completing while validating/assimilating) with the tasks,
              volunteers and hosts as job parameters.
``finish``    for each accepted job Airlock finished: done -> upload the validated outputs from TRUSTED
              storage as the output sandbox (as the owner), register each output file, and only then
              report Done; failed -> report Failed, or reschedule, per ``dirac_failure_policy``.
              Each step's progress is recorded (``sandbox_ref``, ``registered``) before the next, so a
              crash redoes a step at most and Done is never reported before the outputs are up. An
              upload is recorded as begun (event ``upstream.sandbox_upload``, with the output sandboxes
              the job had then) before it is made: a redo first asks the upstream for a sandbox that
              appeared since, and takes that one instead of uploading a second.
Nothing a volunteer produced is read before the assimilator has put the validated copy in trusted storage.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from airlock.config import Settings
from airlock.context import Gateway
from airlock.core.checksums import digest_file
from airlock.core.errors import BadInput
from airlock.core.schemas import FILE_NAME_RE, BatchSpec, InputSpec, JobSpec, OutputSpec, Resources
from airlock.core.states import JobState, TaskState, UpstreamJobState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.schema import file_kind
from airlock.db.transitions import record_event, transition
from airlock.generator.inputs import input_key, register_input
from airlock.generator.submit import submit_batch
from airlock.scheduler.replication import cancel_job
from airlock.upstream.base import (
    COMPLETING,
    DONE,
    FAILED,
    KILL,
    RUNNING,
    InputSizing,
    OutputSandboxListing,
    Upstream,
    UpstreamError,
    UpstreamJob,
    UpstreamStatus,
)
from airlock.upstream.jdl import REFUSED_PREFIX

log = logging.getLogger("airlock.upstream")

U = UpstreamJobState
MATCHED, ACCEPTED = U.MATCHED.value, U.ACCEPTED.value
UPSTREAM_FINAL = frozenset(s.value for s in (U.REFUSED, U.KILLED, U.DONE, U.FAILED, U.RESCHEDULED))
DOWNLOAD_GIVE_UP_S = 3600  # inputs that cannot be fetched for this long: the job is refused
SANDBOX_UPLOAD = "upstream.sandbox_upload"  # event: an output sandbox upload was begun

ACCEPTED_STATUS = UpstreamStatus(RUNNING, "Job accepted by Airlock", "Waiting for a volunteer")
KILLED_STATUS = UpstreamStatus("Killed", "Marked for termination", "Airlock: volunteer tasks aborted")


class _Taken(Exception):
    """Another gateway process took the matched job in first (the transaction is rolled back)."""


def _size(n: int) -> str:
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 10**4 else f"{n} bytes"


class UpstreamSync:
    def __init__(self, gw: Gateway, upstream: Upstream) -> None:
        self.gw = gw
        self.upstream = upstream
        self.actor = f"upstream:{upstream.name}"
        self.scratch = gw.settings.data_dir / "upstream"

    @property
    def settings(self) -> Settings:
        return self.gw.settings

    # ------------------------------------------------------------------------------------ rows
    def _rows(self, *where: Any) -> list[Any]:
        u = schema.upstream_jobs
        with read(self.gw.engine) as conn:
            return list(
                conn.execute(select(u).where(u.c.upstream == self.upstream.name, *where).order_by(u.c.id))
            )

    def _set(self, row_id: int, **values: Any) -> bool:
        """Write columns other than the state."""
        u = schema.upstream_jobs
        with self.gw.engine.begin() as conn:
            stmt = update(u).where(u.c.id == row_id).values(updated_at=utcnow(), **values)
            return bool(conn.execute(stmt).rowcount == 1)

    def _move(self, row_id: int, target: UpstreamJobState, **values: Any) -> bool:
        """A transition of the row's state machine (`core.states`), with further columns."""
        with self.gw.engine.begin() as conn:
            return transition(conn, target, row_id, self.actor, values={"updated_at": utcnow(), **values})

    def _error(self, row_id: int, exc: Exception) -> None:
        log.warning("upstream job row %s: %s", row_id, exc)
        self._set(row_id, error=str(exc)[:2000])

    # ------------------------------------------------------------------------------- generate
    def _waiting(self) -> int:
        u, j = schema.upstream_jobs, schema.jobs
        with read(self.gw.engine) as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(u.join(j, j.c.id == u.c.job_id))
                    .where(u.c.upstream == self.upstream.name, u.c.state == ACCEPTED)
                    .where(j.c.state == JobState.QUEUED.value)
                ).scalar_one()
            )

    def generate(self) -> int:
        """Take in matched jobs left by a previous pass, then match new ones while there is room."""
        n = sum(self._take(row) for row in self._rows(schema.upstream_jobs.c.state == MATCHED))
        room = min(self.settings.dirac_match_per_pass, self.settings.dirac_max_queued - self._waiting())
        while room > 0:
            try:
                job = self.upstream.fetch_job()
            except UpstreamError as exc:
                log.warning("fetching a job upstream failed: %s", exc)
                break
            if job is None:
                break
            room -= 1
            n += self._take(self._record(job))
        return n

    def _record(self, job: UpstreamJob) -> Any:
        u = schema.upstream_jobs
        now = utcnow()
        with self.gw.engine.begin() as conn:
            attempt = 1 + int(
                conn.execute(
                    select(func.count()).where(u.c.upstream == self.upstream.name, u.c.ref == job.ref)
                ).scalar_one()
            )
            row_id = conn.execute(
                insert(u)
                .values(
                    upstream=self.upstream.name,
                    ref=job.ref,
                    attempt=attempt,
                    state=MATCHED,
                    owner=job.owner,
                    owner_group=job.owner_group,
                    description=job.to_json(),
                    registered=[],
                    created_at=now,
                    updated_at=now,
                )
                .returning(u.c.id)
            ).scalar_one()
            record_event(conn, self.actor, "upstream.matched", "upstream_job", row_id, {"ref": job.ref})
            return conn.execute(select(u).where(u.c.id == row_id)).one()

    def _refuse(self, row: Any, job: UpstreamJob, reason: str) -> int:
        status = UpstreamStatus(FAILED, REFUSED_PREFIX + reason)
        try:
            self.upstream.report_status(job, status)
        except UpstreamError as exc:
            self._error(row.id, exc)
            return 0
        try:  # the whole reason, should the minor status be cut short
            self.upstream.set_parameters(job, {"AirlockRefusal": reason[:1000]})
        except UpstreamError as exc:
            log.warning("upstream job %s: %s", job.ref, exc)
        self._move(row.id, U.REFUSED, reported=status.key(), error=reason)
        log.info("upstream job %s refused: %s", job.ref, reason)
        return 1

    def _too_large(self, total: int, when: str) -> str:
        limit = self.settings.dirac_max_input_bytes
        return f"inputs too large for volunteers' links: {_size(total)} > {_size(limit)} ({when})"

    def _sizes_problem(self, job: UpstreamJob) -> str | None:
        """The refusal of inputs too large for volunteers' links, from the sizes the upstream gives before
        any download (a sandbox's packed size is a lower bound of what it unpacks to); None when they fit
        or the upstream cannot tell (the downloaded bytes are checked then)."""
        if not isinstance(self.upstream, InputSizing) or not job.inputs:
            return None
        sizes = self.upstream.input_sizes(job)
        total = sum(v for v in sizes.values() if v is not None)
        if total > self.settings.dirac_max_input_bytes:
            return self._too_large(total, "before download")
        return None

    def _take(self, row: Any) -> int:
        job = UpstreamJob.from_json(row.description)
        if job.problem:
            return self._refuse(row, job, job.problem)
        incoming = self.scratch / "incoming" / str(row.id)
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            problem = self._sizes_problem(job)
            if problem:
                return self._refuse(row, job, problem)
            files = self.upstream.download_inputs(job, incoming)
        except UpstreamError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            if utcnow() - row.created_at > timedelta(seconds=DOWNLOAD_GIVE_UP_S):
                return self._refuse(row, job, f"cannot fetch the inputs ({exc})")
            self._error(row.id, exc)
            return 0
        try:
            problem = self._check_inputs(job, incoming, files)
            if problem:
                return self._refuse(row, job, problem)
            return self._accept(row, job, incoming, files)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def _check_inputs(self, job: UpstreamJob, folder: Path, files: list[Path]) -> str | None:
        total = 0
        for path in files:
            if path.is_dir() or path.parent != folder:
                top = path.relative_to(folder).parts[0]
                return f"the inputs hold a folder ({top}); Airlock takes files only"
            if not FILE_NAME_RE.match(path.name):
                return f"input {path.name!r} is not a plain file name"
            if path.name in job.outputs:
                return f"input {path.name} has the name of an output"
            total += path.stat().st_size
        if total > self.settings.dirac_max_input_bytes:
            return self._too_large(total, "as downloaded")
        return None

    def job_spec(self, job: UpstreamJob, inputs: list[InputSpec]) -> JobSpec:
        s = self.settings
        copies = s.dirac_copies
        return JobSpec(
            name=job.name,
            app=s.dirac_app,
            command=list(job.command),
            inputs=inputs,
            outputs=[OutputSpec(name=n, max_size=s.dirac_max_output_bytes) for n in job.outputs],
            resources=Resources(
                cores=job.cores, memory_mb=s.dirac_memory_mb, disk_mb=s.dirac_disk_mb, runtime_s=job.runtime_s
            ),
            copies=copies,
            quorum=s.dirac_quorum,
            max_attempts=max(copies, s.dirac_max_attempts),
            deadline_s=s.dirac_deadline_s,
            params={"upstream": self.upstream.name, "upstream_ref": job.ref},
        )

    def _accept(self, row: Any, job: UpstreamJob, folder: Path, files: list[Path]) -> int:
        digests = []
        for path in files:  # into the content-addressed cache: bytes already there are not stored again
            d = digest_file(path)
            key = input_key(d.sha256)
            if not self.gw.inputs.exists(key):
                self.gw.inputs.copy_in(key, path, d)
            digests.append((path.name, d))
        try:
            spec = self.job_spec(
                job, [InputSpec(name=name, sha256=d.sha256, size=d.size) for name, d in digests]
            )
        except ValueError as exc:
            return self._refuse(row, job, f"cannot make an Airlock job of it ({exc})")
        batch = BatchSpec(
            name=f"{self.upstream.name}-{job.ref}",
            owner=job.owner,
            upstream=self.upstream.name,
            upstream_ref=job.ref,
            jobs=[spec],
        )
        u = schema.upstream_jobs
        try:
            with self.gw.engine.begin() as conn:
                for _, d in digests:
                    register_input(conn, d)
                created = submit_batch(conn, batch, self.actor)
                # a second gateway process that took the same job in first makes this a no-op: roll back
                if not transition(
                    conn,
                    U.ACCEPTED,
                    row.id,
                    self.actor,
                    values={"batch_id": created.batch_id, "job_id": created.jobs[0], "updated_at": utcnow()},
                    detail={"job_id": created.jobs[0]},
                ):
                    raise _Taken
        except _Taken:
            return 0
        except BadInput as exc:  # nothing was created
            return self._refuse(row, job, str(exc))
        log.info("upstream job %s accepted as Airlock job %s", job.ref, created.jobs[0])
        try:
            self._monitor_one(self._rows(u.c.id == row.id)[0], heartbeat=False)
        except UpstreamError as exc:  # the monitor loop reports it later
            self._error(row.id, exc)
        return 1

    # -------------------------------------------------------------------------------- monitor
    def _in_flight(self) -> list[tuple[Any, Any]]:
        u, j = schema.upstream_jobs, schema.jobs
        with read(self.gw.engine) as conn:
            return [
                (r, r.job_state)
                for r in conn.execute(
                    select(u, j.c.state.label("job_state"), j.c.reason.label("job_reason"))
                    .join(j, j.c.id == u.c.job_id)
                    .where(u.c.upstream == self.upstream.name, u.c.state == ACCEPTED)
                    .order_by(u.c.id)
                )
            ]

    def _tasks(self, conn: Connection, job_id: int) -> list[Any]:
        t = schema.tasks
        return list(
            conn.execute(
                select(t.c.id, t.c.state, t.c.volunteer_id, t.c.host_id, t.c.cpu_time_s)
                .where(t.c.job_id == job_id)
                .order_by(t.c.id)
            )
        )

    def monitor(self) -> int:
        """Heartbeat and report the state of every job in flight; returns the reports made."""
        n = 0
        for row, state in self._in_flight():
            if state in (JobState.FAILED.value, JobState.CANCELLED.value):
                continue
            try:  # a done job still heartbeats until its outputs are handed back (`finish` reports)
                n += self._monitor_one(row, report=state != JobState.DONE.value)
            except UpstreamError as exc:
                self._error(row.id, exc)
        return n

    def _desired(self, job_state: str, tasks: list[Any]) -> UpstreamStatus:
        leased = [t for t in tasks if t.state == TaskState.LEASED.value]
        if job_state == JobState.VALIDATING.value:
            return UpstreamStatus(COMPLETING, "Validating volunteer results")
        if job_state == JobState.ASSIMILATING.value:
            return UpstreamStatus(COMPLETING, "Assimilating validated outputs")
        if leased:
            hosts = sorted({t.host_id for t in leased})
            return UpstreamStatus(
                RUNNING, "Application", f"Running on volunteer host {', '.join(map(str, hosts))}"[:250]
            )
        return ACCEPTED_STATUS

    def _monitor_one(self, row: Any, *, heartbeat: bool = True, report: bool = True) -> int:
        job = UpstreamJob.from_json(row.description)
        j = schema.jobs
        with read(self.gw.engine) as conn:
            job_state = conn.execute(select(j.c.state).where(j.c.id == row.job_id)).scalar_one()
            tasks = self._tasks(conn, row.job_id)
        now = utcnow()
        due = row.heartbeat_at is None or now - row.heartbeat_at >= timedelta(
            seconds=self.settings.dirac_heartbeat_interval_s
        )
        if heartbeat and due and row.reported is not None:
            cpu = sum(t.cpu_time_s or 0.0 for t in tasks)
            commands = self.upstream.heartbeat(job, {"CPUConsumed": round(cpu, 1)})
            self._set(row.id, heartbeat_at=now)
            if KILL in commands:
                self._kill(row)
                return 1
        desired = self._desired(job_state, tasks)
        if not report or desired.key() == row.reported:
            return 0
        self.upstream.report_status(job, desired)
        self._set(row.id, reported=desired.key(), error=None)
        self._trace(job, row.job_id, tasks)
        return 1

    def _trace(self, job: UpstreamJob, job_id: int, tasks: list[Any]) -> None:
        """The Airlock job, its tasks, volunteers and hosts, as parameters of the upstream job."""
        params: dict[str, str | int | float] = {"AirlockJob": job_id}
        if tasks:
            params["AirlockTasks"] = ",".join(str(t.id) for t in tasks)
            params["AirlockVolunteers"] = ",".join(
                sorted({str(t.volunteer_id) for t in tasks if t.volunteer_id})
            )
            params["AirlockHosts"] = ",".join(sorted({str(t.host_id) for t in tasks if t.host_id}))
        try:
            self.upstream.set_parameters(job, params)
        except UpstreamError as exc:
            log.warning("job parameters of upstream job %s: %s", job.ref, exc)

    def _kill(self, row: Any) -> None:
        """The upstream killed the job: cancel it as the operator would (its volunteer tasks are aborted),
        then confirm the kill upstream (as a pilot's watchdog does)."""
        with self.gw.engine.begin() as conn:
            cancelled = cancel_job(conn, row.job_id, self.actor, f"killed in {self.upstream.name}")
            transition(
                conn,
                U.KILLED,
                row.id,
                self.actor,
                values={"updated_at": utcnow(), "error": None},
                detail={"job_cancelled": cancelled},
            )
        log.info("upstream job %s killed upstream: Airlock job %s cancelled", row.ref, row.job_id)
        self._confirm_kill(row)

    def _confirm_kill(self, row: Any) -> int:
        if row.reported == KILLED_STATUS.key():
            return 0
        try:
            self.upstream.report_status(UpstreamJob.from_json(row.description), KILLED_STATUS)
        except UpstreamError as exc:  # retried by `finish`
            self._error(row.id, exc)
            return 0
        self._set(row.id, reported=KILLED_STATUS.key(), error=None)
        return 1

    # --------------------------------------------------------------------------------- finish
    def finish(self) -> int:
        """Give the outcome of every job Airlock finished back to the upstream."""
        u = schema.upstream_jobs
        n = sum(
            self._confirm_kill(row) for row in self._rows(u.c.state == U.KILLED.value, u.c.error.is_not(None))
        )
        for row, state in self._in_flight():
            try:
                if state == JobState.DONE.value:
                    n += self._finish_done(row)
                elif state in (JobState.FAILED.value, JobState.CANCELLED.value):
                    n += self._finish_failed(row, state)
            except UpstreamError as exc:
                self._error(row.id, exc)
        return n

    def _trusted_outputs(self, row: Any, staging: Path) -> dict[str, Path]:
        """The validated outputs, read from TRUSTED storage only (staged locally if it is remote)."""
        f = schema.files
        with read(self.gw.engine) as conn:
            files = list(conn.execute(select(f).where(file_kind("trusted"), f.c.job_id == row.job_id)))
        out: dict[str, Path] = {}
        for tf in files:
            path = self.gw.trusted.local_path(tf.location)
            if path is None or path.name != tf.name:
                staging.mkdir(parents=True, exist_ok=True)
                path = staging / tf.name
                with self.gw.trusted.open_read(tf.location) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            if digest_file(path).sha256 != tf.sha256:
                raise UpstreamError(f"{tf.name} in trusted storage does not match its checksum")
            out[tf.name] = path
        return out

    def _finish_done(self, row: Any) -> int:
        job = UpstreamJob.from_json(row.description)
        uploading = UpstreamStatus(COMPLETING, "Uploading Output Sandbox")
        if row.sandbox_ref is None and row.reported != uploading.key():
            self.upstream.report_status(job, uploading)
            self._set(row.id, reported=uploading.key())
        staging = self.scratch / "outgoing" / str(row.id)
        try:
            outputs = self._trusted_outputs(row, staging)
            missing = [n for n in job.outputs if n not in outputs]
            if missing:
                raise UpstreamError(f"job {row.job_id} is done but {missing} are not in trusted storage")
            if row.sandbox_ref is None:
                ref = ""
                if job.output_sandbox:
                    ref = self._upload_sandbox(row, job, [outputs[n] for n in job.output_sandbox])
                self._set(row.id, sandbox_ref=ref)
            registered = list(row.registered or [])
            for out in job.output_data:
                if out.lfn in registered:
                    continue
                if not self.upstream.output_registered(job, out):
                    self.upstream.register_output(job, out, outputs[out.name])
                registered.append(out.lfn)
                self._set(row.id, registered=registered)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        done = UpstreamStatus(DONE, "Execution Complete", "Validated by Airlock")
        self.upstream.report_status(job, done)
        self._move(row.id, U.DONE, reported=done.key(), error=None)
        log.info("upstream job %s done (Airlock job %s)", job.ref, row.job_id)
        return 1

    def _upload_begun(self, row: Any) -> Any:
        """The record of an output sandbox upload begun for this row (its detail: ``before``, the output
        sandboxes the job had upstream then, or None), or None."""
        e = schema.events
        with read(self.gw.engine) as conn:
            return conn.execute(
                select(e.c.detail)
                .where(
                    e.c.action == SANDBOX_UPLOAD, e.c.object_type == "upstream_job", e.c.object_id == row.id
                )
                .order_by(e.c.id)
                .limit(1)
            ).first()

    def _upload_sandbox(self, row: Any, job: UpstreamJob, files: list[Path]) -> str:
        """Upload the output sandbox once: when an earlier upload was begun (and may have gone through
        before a crash), take the sandbox that appeared upstream since instead of uploading another."""
        listing = self.upstream if isinstance(self.upstream, OutputSandboxListing) else None
        begun = self._upload_begun(row)
        before = (begun.detail or {}).get("before") if begun is not None else None
        if before is not None and listing is not None:
            new = sorted(set(listing.output_sandboxes(job)) - set(before))
            if new:
                log.info("upstream job %s: output sandbox %s already uploaded, not again", job.ref, new[-1])
                return new[-1]
        if begun is None:
            # what the job already had (e.g. from a run before the gateway took it), to tell ours apart
            before_now = sorted(listing.output_sandboxes(job)) if listing is not None else None
            with self.gw.engine.begin() as conn:
                record_event(conn, self.actor, SANDBOX_UPLOAD, "upstream_job", row.id, {"before": before_now})
        return self.upstream.upload_output_sandbox(job, files) or ""

    def _finish_failed(self, row: Any, state: str) -> int:
        job = UpstreamJob.from_json(row.description)
        reason = row.job_reason or state
        if state == JobState.FAILED.value and self.settings.dirac_failure_policy == "reschedule":
            self.upstream.reschedule(job)
            self._move(row.id, U.RESCHEDULED, error=None)
            return 1
        failed = UpstreamStatus(FAILED, REFUSED_PREFIX + reason)
        self.upstream.report_status(job, failed)
        self._move(row.id, U.FAILED, reported=failed.key(), error=None)
        return 1


# ---------------------------------------------------------------------------------- traceability
def trace(conn: Connection, upstream: str, ref: str) -> list[dict[str, Any]]:
    """Upstream job id -> each time it was taken in: its Airlock job and that job's tasks, volunteers and
    hosts."""
    u, t, h = schema.upstream_jobs, schema.tasks, schema.hosts
    out: list[dict[str, Any]] = []
    for row in conn.execute(select(u).where(u.c.upstream == upstream, u.c.ref == ref).order_by(u.c.attempt)):
        tasks = []
        if row.job_id is not None:
            for task in conn.execute(
                select(t.c.id, t.c.state, t.c.volunteer_id, t.c.host_id, h.c.name.label("host_name"))
                .select_from(t.outerjoin(h, h.c.id == t.c.host_id))
                .where(t.c.job_id == row.job_id)
                .order_by(t.c.id)
            ):
                tasks.append(dict(task._mapping))
        out.append(
            {
                "attempt": row.attempt,
                "state": row.state,
                "reported": row.reported,
                "batch_id": row.batch_id,
                "job_id": row.job_id,
                "tasks": tasks,
            }
        )
    return out


def upstream_of_job(conn: Connection, job_id: int) -> Mapping[str, Any] | None:
    """Airlock job id -> the upstream job it runs (upstream, ref, attempt, state), or None."""
    u = schema.upstream_jobs
    row = conn.execute(
        select(u.c.upstream, u.c.ref, u.c.attempt, u.c.state, u.c.reported).where(u.c.job_id == job_id)
    ).one_or_none()
    return None if row is None else dict(row._mapping)
