"""One task, from assignment to report.

A *task* is one attempt at a job, leased to this host until `lease_expires_at`; the agent keeps the lease
alive with heartbeats while it works. The runner:

1. makes `<work dir>/tasks/<task id>/` and downloads every input into it, verifying size, adler32 and
   sha256 (a mismatch is reported as exit code -1 with the reason in `stderr_tail`, and no outputs);
2. runs the command in the sandbox, heartbeating every `heartbeat_interval_s`; if a heartbeat answers
   `abort: true`, or 409/410 (the lease is gone), the payload is killed and the task dropped unreported;
3. uploads each declared output that the payload produced to the data bridge's *quarantine* area (where
   results wait, untrusted, until the validator accepts them) with the task's upload token and a `Digest`
   header; 201 and 200 (an identical retry) are success, refusals are noted in the report's stderr tail;
4. reports exit code, CPU and wall time, the stderr tail and the uploaded outputs, then deletes the task
   directory. A 409 "already reported" counts as done.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from airlock.agent.client import ApiError, Blocked, Cancelled, InputMismatch, LeaseGone, ServerClient
from airlock.agent.faults import Behaviour
from airlock.agent.sandbox import STDERR_TAIL_BYTES, Limits, PayloadResult, Sandbox
from airlock.core.checksums import digest_file
from airlock.core.schemas import OutputReport, TaskAssignment, TaskReport

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How the agent's handling of a task ended."""

    REPORTED = "reported"  # report accepted (or already there)
    INPUT_ERROR = "input_error"  # an input could not be fetched or verified; reported as exit -1
    ABORTED = "aborted"  # the server cancelled it or the lease is gone; dropped unreported
    LOST = "lost"  # the report was refused (4xx); dropped
    VANISHED = "vanished"  # misbehave=vanish: abandoned on purpose
    CANCELLED = "cancelled"  # the agent is stopping
    BLOCKED = "blocked"  # the server refused the volunteer (403)


@dataclass
class TaskContext:
    """What every task runner shares."""

    client: ServerClient
    sandbox: Sandbox
    host_id: int
    tasks_dir: Path
    behaviour: Behaviour = field(default_factory=Behaviour)


class Heartbeater(threading.Thread):
    """Keeps a task's lease alive; sets the runner's `abort` event when the server wants the task back."""

    def __init__(self, ctx: TaskContext, task: TaskAssignment, abort: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{task.task_id}", daemon=True)
        self.ctx = ctx
        self.task = task
        self.abort = abort
        self.done = threading.Event()
        self.reason: str | None = None
        self.blocked = False
        # Upload tokens live minutes: each heartbeat brings a fresh one and uploads use the newest.
        self.upload_token = task.upload_token

    def run(self) -> None:
        interval = max(1.0, float(self.task.heartbeat_interval_s))
        tid = self.task.task_id
        while not self.done.wait(interval):
            try:
                reply = self.ctx.client.heartbeat(tid, self.ctx.host_id, cancel=self.done)
            except LeaseGone as exc:
                self._stop(f"lease gone (HTTP {exc.status}: {exc.message})")
                return
            except Blocked:
                self.blocked = True
                self._stop("volunteer blocked")
                return
            except Cancelled:
                return
            except ApiError as exc:
                log.warning("task %d: heartbeat refused: %s", tid, exc)
                continue
            if reply.abort:
                self._stop("the server asked to abort")
                return
            if reply.upload_token:
                self.upload_token = reply.upload_token
            log.debug("task %d: heartbeat ok, lease until %s", tid, reply.lease_expires_at)

    def _stop(self, reason: str) -> None:
        self.reason = reason
        log.warning("task %d: %s; killing the payload", self.task.task_id, reason)
        self.abort.set()


class TaskRunner:
    """Handles one TaskAssignment; `run()` blocks until the task is reported or dropped."""

    def __init__(self, ctx: TaskContext, task: TaskAssignment) -> None:
        self.ctx = ctx
        self.task = task
        self.abort = threading.Event()  # kill the payload and drop the task
        self.vanishing = False
        self.result: PayloadResult | None = None
        self.outcome: Outcome | None = None
        self.dir = ctx.tasks_dir / str(task.task_id)

    @property
    def tid(self) -> int:
        return self.task.task_id

    def run(self) -> Outcome:
        try:
            return self._run()
        except Blocked:
            self.abort.set()
            return Outcome.BLOCKED
        except Cancelled:
            log.info("task %d: dropped (%s)", self.tid, "agent stopping" if not self.vanishing else "vanish")
            return Outcome.VANISHED if self.vanishing else Outcome.CANCELLED

    def _run(self) -> Outcome:
        t, ctx, behaviour = self.task, self.ctx, self.ctx.behaviour
        log.info("task %d (job %d): received: %s", self.tid, t.job_id, " ".join(t.command)[:200])
        self._clean()
        self.dir.mkdir(parents=True)
        heart = Heartbeater(ctx, t, self.abort)
        if behaviour.vanish_after_s is None:
            heart.start()
        try:
            outcome = self._work(heart)
        finally:
            heart.done.set()
        return Outcome.BLOCKED if heart.blocked else outcome

    def _work(self, heart: Heartbeater) -> Outcome:
        t, ctx, behaviour = self.task, self.ctx, self.ctx.behaviour
        try:
            for ref in t.inputs:
                ctx.client.download(ref, self.dir / ref.name, cancel=self.abort)
                log.info("task %d: input %s verified (%d bytes)", self.tid, ref.name, ref.size)
        except (InputMismatch, ApiError) as exc:
            if isinstance(exc, Blocked):
                raise
            log.error("task %d: input failed: %s", self.tid, exc)
            return self._report(-1, f"airlock: input failed: {exc}\n", [], Outcome.INPUT_ERROR, heart)
        if self.abort.is_set():
            return self._dropped(heart)
        ctx.sandbox.prepare_task_dir(self.dir)
        timer: threading.Timer | None = None
        if behaviour.vanish_after_s is not None:
            self.vanishing = True
            timer = threading.Timer(behaviour.vanish_after_s, self.abort.set)
            timer.daemon = True
            timer.start()
        log.info("task %d: payload started", self.tid)
        try:
            result = ctx.sandbox.run(
                self.tid, self.dir, t.command, t.env, Limits.for_resources(t.resources), abort=self.abort
            )
        except ValueError as exc:  # e.g. an invalid environment variable in the job
            return self._report(-1, f"airlock: cannot run the command: {exc}\n", [], Outcome.REPORTED, heart)
        finally:
            if timer is not None:
                timer.cancel()
        self.result = result
        if self.vanishing:
            log.warning("task %d: misbehave=vanish: abandoning the task", self.tid)
            return Outcome.VANISHED
        if result.aborted or self.abort.is_set():
            return self._dropped(heart)
        code = behaviour.exit_code(result.exit_code)
        log.info(
            "task %d: payload exited %d (cpu %.1f s, wall %.1f s)",
            self.tid, result.exit_code, result.cpu_time_s, result.wall_time_s,
        )  # fmt: skip
        outputs, notes = self._upload_outputs(heart)
        if self.abort.is_set():
            return self._dropped(heart)
        return self._report(code, result.stderr_tail + notes, outputs, Outcome.REPORTED, heart)

    # ------------------------------------------------------------------------------------- outputs

    def _upload_outputs(self, heart: Heartbeater) -> tuple[list[OutputReport], str]:
        t, ctx, behaviour = self.task, self.ctx, self.ctx.behaviour
        reports: list[OutputReport] = []
        notes: list[str] = []
        for out in t.outputs:
            path = self.dir / out.name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                notes.append(f"airlock: output {out.name} was not produced")
                continue
            if not stat.S_ISREG(st.st_mode):  # a symlink could point at the volunteer's files
                notes.append(f"airlock: output {out.name} is not a regular file; not uploaded")
                continue
            if st.st_size > out.max_size:
                notes.append(f"airlock: output {out.name} is {st.st_size} bytes, over its {out.max_size}")
                continue
            declared = behaviour.prepare_output(path, digest_file(path))
            response = ctx.client.upload(
                out.upload_url, path, heart.upload_token, declared, cancel=self.abort
            )
            entry = OutputReport(
                name=out.name, size=declared.size, adler32=declared.adler32, sha256=declared.sha256
            )
            if response.stored:
                log.info("task %d: output %s uploaded (%d bytes)", self.tid, out.name, declared.size)
                reports.append(entry)
                continue
            message = response.message
            log.warning(
                "task %d: upload of %s refused: HTTP %d %s", self.tid, out.name, response.status_code, message
            )
            notes.append(f"airlock: upload of {out.name} refused: HTTP {response.status_code} {message}")
            if behaviour.report_refused_outputs:
                reports.append(entry)
        for name, path in behaviour.extra_uploads(self.dir):
            url = t.outputs[0].upload_url.rsplit("/", 1)[0] + "/" + name
            response = ctx.client.upload(url, path, heart.upload_token, digest_file(path), cancel=self.abort)
            log.warning(
                "task %d: undeclared upload %s answered HTTP %d %s",
                self.tid, name, response.status_code, response.message,
            )  # fmt: skip
        return reports, ("\n".join(notes) + "\n") if notes else ""

    # -------------------------------------------------------------------------------------- report

    def _report(
        self, code: int, stderr: str, outputs: list[OutputReport], ok: Outcome, heart: Heartbeater
    ) -> Outcome:
        r = self.result
        report = TaskReport(
            host_id=self.ctx.host_id,
            exit_code=code,
            cpu_time_s=max(0.0, r.cpu_time_s) if r else 0.0,
            wall_time_s=max(0.0, r.wall_time_s) if r else 0.0,
            stderr_tail=stderr[-STDERR_TAIL_BYTES:],
            outputs=outputs,
        )
        try:
            state = self.ctx.client.report(self.tid, report, cancel=self.abort)
        except Blocked:
            raise
        except ApiError as exc:
            log.error("task %d: report refused (%s); dropping the task", self.tid, exc)
            self._clean()
            return Outcome.LOST
        heart.done.set()
        log.info(
            "task %d: reported exit %d with %d output(s); task now %s", self.tid, code, len(outputs), state
        )
        self._clean()
        return ok

    def _dropped(self, heart: Heartbeater) -> Outcome:
        log.warning("task %d: dropped without report (%s)", self.tid, heart.reason or "agent stopping")
        self._clean()
        return Outcome.ABORTED if heart.reason else Outcome.CANCELLED

    def _clean(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for extra in self.ctx.tasks_dir.glob(f"{self.tid}.*"):
            extra.unlink(missing_ok=True)
