"""The BOINC scheduler RPC over Airlock's own scheduler.

One RPC is one transaction: find the volunteer by its authenticator (unknown or blocked: a message and
nothing else), find or register the host, take the reported results through the same `report_task` as
the native API (which checks everything before it writes, so a bad one changes nothing and the rest still
count), tell the
client to abort what it must not run any more, resend what it lost, and lease new tasks through
`request_work` with the report deadline as the lease.

Acknowledgements follow BOINC: every reported result is acknowledged, accepted or not (else the client
re-reports it forever), with a message when it was refused, except one aborted by the client fewer than
`boinc_abort_ack_delay_s` after we sent the abort: the client kills a non-API app only after 60 s, and
acknowledging earlier makes it forget the task and orphan the process.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, exists, select, update

from airlock.boinc.apps import AppVersion
from airlock.boinc.names import parse_pilot_name, parse_result_name, pilot_name, result_name, workunit_name
from airlock.boinc.project import BoincProject
from airlock.boinc.protocol import ReportedResult, SchedulerRequest
from airlock.boinc.reply import InputFile, Message, OutputFile, Result, SchedulerReply, Workunit
from airlock.boinc.signing import file_md5_hex
from airlock.core.errors import AirlockError
from airlock.core.schemas import HostRegistration, OutputReport, TaskReport, WorkRequest
from airlock.core.states import TaskState, VolunteerState
from airlock.credentials.tokens import COMPUTE_SCOPES, Grant, TokenIssuer, record_credential
from airlock.db import schema
from airlock.db.engine import hot_begin, utcnow
from airlock.db.fast import Fast
from airlock.db.schema import file_kind
from airlock.generator.inputs import input_key
from airlock.scheduler.dispatch import host_row, lease_tasks, register_host
from airlock.scheduler.leases import LEASE_COLUMNS
from airlock.scheduler.report import report_task
from airlock.storage.base import Storage

# BOINC result states in a report (client/result.h)
UPLOADED = 5
ABORTED = 6
UNKNOWN_ACCOUNT_DELAY_S = 3600.0
MAX_SLOTS = 64
INPUT_CACHE_ENTRIES = 100_000

_V, _T, _J, _F, _H = schema.volunteers, schema.tasks, schema.jobs, schema.files, schema.hosts
_VOLUNTEER = Fast(select(_V.c.id, _V.c.name, _V.c.state).where(_V.c.authenticator == bindparam("auth")))
_TASK = Fast(select(*LEASE_COLUMNS, _T.c.abort_sent_at).where(_T.c.id == bindparam("id")))
_LEASED_HERE = Fast(
    select(_T.c.id, _T.c.job_id, _T.c.deadline).where(
        _T.c.host_id == bindparam("host"), _T.c.state == TaskState.LEASED.value
    )
)
_SPEC = Fast(select(_J.c.spec).where(_J.c.id == bindparam("id")))
_OUTPUTS = Fast(
    select(_F.c.name, _F.c.size, _F.c.adler32, _F.c.sha256).where(
        _F.c.task_id == bindparam("task"), file_kind("output")
    )
)
_INPUT = Fast(
    select(_F.c.id, _F.c.sha256, _F.c.size, _F.c.md5).where(
        file_kind("input"), _F.c.sha256 == bindparam("sha256")
    )
)


@dataclass
class Rpc:
    """What one RPC needs besides its connection."""

    project: BoincProject
    issuer: TokenIssuer
    inputs: Storage


@dataclass
class Answer:
    """What an RPC's transaction decided: the reply, and the pilots' access token to sign into its
    preferences once the transaction has committed (`signed_reply`)."""

    reply: SchedulerReply
    pilot_token: Grant | None = None


def signed_reply(answer: Answer, issuer: TokenIssuer) -> SchedulerReply:
    """The reply of a committed RPC, with the pilots' access token signed (outside the transaction:
    an ES256 signature need not hold SQLite's writer turn)."""
    if answer.pilot_token is not None:
        prefs = answer.reply.project_specific or {}
        answer.reply.project_specific = {**prefs, "airlock_token": issuer.sign(answer.pilot_token).token}
    return answer.reply


def handle_request(engine: Engine, rpc: Rpc, req: SchedulerRequest) -> Answer:
    """The RPC's one transaction (the reply still to be signed and rendered: `signed_reply`)."""
    settings = rpc.project.settings
    reply = SchedulerReply(
        project_name=settings.boinc_project_name,
        master_url=rpc.project.master_url,
        next_rpc_delay=settings.boinc_next_rpc_delay_s,
    )
    if not req.has_code_sign_key and rpc.project.code_sign_key:
        reply.code_sign_key = rpc.project.code_sign_key
    pilot_token: Grant | None = None
    with hot_begin(engine) as conn:
        volunteer = _VOLUNTEER.one_or_none(conn, {"auth": req.authenticator})
        if volunteer is None:
            reply.messages.append(
                Message(
                    "Unknown account key. Attach with the authenticator this project gave you "
                    "(boinccmd --lookup_account URL EMAIL PASSWORD shows it).",
                    "high",
                )
            )
            reply.request_delay = UNKNOWN_ACCOUNT_DELAY_S
            reply.code_sign_key = None
            return Answer(reply)
        reply.userid, reply.user_name = volunteer.id, volunteer.name
        if volunteer.state != VolunteerState.ACTIVE.value:
            reply.messages.append(
                Message("This volunteer account is blocked by the project: no work will be sent.", "high")
            )
            reply.acks.extend(r.name for r in req.results)  # nothing is recorded from a blocked account
            reply.aborts.extend(req.other_results)
            reply.request_delay = UNKNOWN_ACCOUNT_DELAY_S
            return Answer(reply)
        host = _host(conn, rpc, volunteer.id, req)
        host_id = reply.hostid = host.id
        now = utcnow()
        for reported in req.results:
            _report(conn, rpc, volunteer.id, host_id, reported, now, reply)
        in_progress, pilots = _reconcile(conn, rpc, volunteer.id, host_id, req, now, reply)
        if rpc.project.settings.boinc_vacuum:
            if req.work_req_seconds > 0:
                pilots += _send_pilots(conn, rpc, host_id, req, in_progress, now, reply)
            if pilots:
                reply.project_specific = {"airlock_gateway": rpc.project.settings.public_url}
                pilot_token = _pilot_credentials(conn, rpc, volunteer.id, now)
        elif req.work_req_seconds > 0:
            _send_work(conn, rpc, volunteer.id, host, req, in_progress, reply)
    return Answer(reply, pilot_token)


def _host(conn: Connection, rpc: Rpc, volunteer_id: int, req: SchedulerRequest) -> Any:
    """The client's host row (as `own_host` returns it), or a new host's (first contact, or a host id
    that is not this volunteer's: BOINC makes a new host then too)."""
    if req.hostid:
        host = host_row(conn, req.hostid)
        if host is not None and host.volunteer_id == volunteer_id:
            return host
    h = req.host
    registration = HostRegistration(
        name=(h.domain_name or h.p_model or h.host_cpid or "boinc host")[:128],
        platform=(req.platform_name or "unknown")[:64],
        cores=min(max(1, h.p_ncpus), 4096),
        memory_mb=min(max(1, int(h.m_nbytes / 2**20)), 2**31 - 1),
        disk_mb=min(max(1, int(h.d_free / 2**20)), 2**31 - 1),
    )
    host_id = register_host(conn, rpc.project.settings, volunteer_id, registration).host_id
    return host_row(conn, host_id)


def _report(
    conn: Connection,
    rpc: Rpc,
    volunteer_id: int,
    host_id: int,
    r: ReportedResult,
    now: datetime,
    reply: SchedulerReply,
) -> None:
    pilot_host = parse_pilot_name(r.name)
    if pilot_host is not None:  # a pilot's own result: its tasks were reported by the agent itself
        if pilot_host != host_id:
            reply.messages.append(Message(f"{r.name} was not sent to this host; the report was ignored."))
        reply.acks.append(r.name)
        return
    ids = parse_result_name(r.name)
    task = _TASK.one_or_none(conn, {"id": ids[1]}) if ids else None
    if ids is None or task is None or task.job_id != ids[0]:
        reply.messages.append(Message(f"{r.name} is not a result of this project; it was ignored."))
        reply.acks.append(r.name)
        return
    if task.volunteer_id != volunteer_id or task.host_id != host_id:
        reply.messages.append(Message(f"{r.name} was not sent to this host; the report was ignored."))
        reply.acks.append(r.name)
        return
    if r.state == ABORTED and task.abort_sent_at is not None:
        waited = (now - task.abort_sent_at).total_seconds()
        if waited < rpc.project.settings.boinc_abort_ack_delay_s:
            return  # acknowledged on a later RPC, once the client has surely killed the app
    if task.state != TaskState.LEASED.value:
        if task.state in (TaskState.LOST.value, TaskState.ABORTED.value) and r.state != ABORTED:
            reply.messages.append(Message(f"{r.name} came back after it was reissued or cancelled."))
        reply.acks.append(r.name)  # already reported, or no longer wanted: nothing to record
        return
    outputs = [OutputReport(**row._asdict()) for row in _OUTPUTS.rows(conn, {"task": task.id})]
    exit_code = r.exit_status if r.exit_status != 0 or r.state == UPLOADED else -1
    report = TaskReport(
        host_id=host_id,
        exit_code=max(-(2**31), min(exit_code, 2**31 - 1)),
        cpu_time_s=max(0.0, r.final_cpu_time),
        wall_time_s=max(0.0, r.final_elapsed_time),
        stderr_tail=_stderr(r),
        outputs=outputs,
    )
    try:  # no savepoint needed: report_task refuses before it writes anything
        report_task(conn, volunteer_id, task.id, report, task=task)
    except AirlockError as exc:
        reply.messages.append(Message(f"{r.name}: {exc.message}"))
    reply.acks.append(r.name)


def _stderr(r: ReportedResult) -> str:
    states = {1: "download failed", 3: "compute error", UPLOADED: "done", ABORTED: "aborted"}
    head = f"[boinc] result state {r.state} ({states.get(r.state, 'unknown')}), exit status {r.exit_status}\n"
    return (head + r.stderr_out)[-65536:]


def _reconcile(
    conn: Connection,
    rpc: Rpc,
    volunteer_id: int,
    host_id: int,
    req: SchedulerRequest,
    now: datetime,
    reply: SchedulerReply,
) -> tuple[int, int]:
    """Abort what the client must not run, resend what it lost; return how many tasks it is running,
    and how many of them are pilots."""
    held = set(req.other_results)
    reported = {r.name for r in req.results}
    running = pilots = 0
    to_abort: list[int] = []
    for name in sorted(held):
        if (pilot_host := parse_pilot_name(name)) is not None:
            if pilot_host == host_id:
                running, pilots = running + 1, pilots + 1
            else:
                reply.aborts.append(name)
            continue
        ids = parse_result_name(name)
        task = _TASK.one_or_none(conn, {"id": ids[1]}) if ids else None
        if task is None or ids is None or task.job_id != ids[0] or task.host_id != host_id:
            reply.aborts.append(name)  # not ours, or not this host's: it must not run here
            continue
        if task.state == TaskState.LEASED.value and task.deadline > now:
            running += 1
            continue
        if task.state in (TaskState.ABORTED.value, TaskState.LOST.value, TaskState.LEASED.value):
            reply.aborts.append(name)
            if task.abort_sent_at is None:
                to_abort.append(task.id)
    if to_abort:
        conn.execute(update(_T).where(_T.c.id.in_(to_abort)).values(abort_sent_at=now))
    # Lost results: leased to this host, but the client neither holds nor reports them (the reply that
    # carried them was lost, or the client was reset). BOINC resends them while the deadline allows.
    for leased in _LEASED_HERE.rows(conn, {"host": host_id}):
        name = result_name(leased.job_id, leased.id)
        if name in held or name in reported or leased.deadline <= now:
            continue
        version = _app_version(rpc, req)
        if version is None:
            break
        spec = _SPEC.one(conn, {"id": leased.job_id}).spec
        _add_work(conn, rpc, reply, version, leased.job_id, leased.id, spec, leased.deadline)
        reply.messages.append(Message(f"resent lost task {name}"))
        running += 1
    return running, pilots


def _app_version(rpc: Rpc, req: SchedulerRequest) -> AppVersion | None:
    platforms = [p for p in (req.platform_name, *req.alternate_platforms) if p]
    return rpc.project.version_for(rpc.project.settings.boinc_app, platforms)


def _send_work(
    conn: Connection,
    rpc: Rpc,
    volunteer_id: int,
    host: Any,
    req: SchedulerRequest,
    in_progress: int,
    reply: SchedulerReply,
) -> None:
    version = _app_version(rpc, req)
    if version is None:
        reply.messages.append(
            Message(f"No signed version of {rpc.project.settings.boinc_app} for {req.platform_name} yet.")
        )
        return
    slots = min(MAX_SLOTS, req.host.p_ncpus - in_progress)  # one task per core, none buffered
    if slots <= 0:
        return
    leasing = lease_tasks(
        conn,
        rpc.project.settings,
        volunteer_id,
        WorkRequest(host_id=host.id, slots=slots),
        lease_to_deadline=True,
        host=host,
    )
    if not leasing.leases:
        refusal = leasing.refusal
        reply.messages.append(
            Message(refusal.message if refusal and refusal.message else "no work right now")
        )
        retry = refusal.retry_after_s if refusal else rpc.project.settings.retry_after_s
        reply.request_delay = float(retry)
        return
    for lease in leasing.leases:
        _add_work(conn, rpc, reply, version, lease.job_id, lease.task_id, lease.spec, lease.lease_expires_at)


def _add_work(
    conn: Connection,
    rpc: Rpc,
    reply: SchedulerReply,
    version: AppVersion,
    job_id: int,
    task_id: int,
    spec: dict[str, Any],
    deadline: datetime,
) -> None:
    project = rpc.project
    if not any(v is version for v, _ in reply.app_versions):
        reply.app_versions.append((version, project.app_base_url(version)))
    inputs = tuple(
        InputFile(
            name=f"airlock_in_{i['sha256']}",
            open_name=i["name"],
            url=project.input_url(i["sha256"]),
            nbytes=size,
            md5=md5,
        )
        for i in spec["inputs"]
        for size, md5 in (_input(conn, rpc, i["sha256"]),)
    )
    resources = spec.get("resources") or {}
    runtime = float(resources.get("runtime_s", 3600))
    job = {
        "command": spec["command"],
        "env": spec.get("env") or {},
        "outputs": [o["name"] for o in spec["outputs"]],
        "time_limit_s": int(runtime * 4),
        "memory_mb": int(resources.get("memory_mb", 512)),
    }
    encoded = base64.urlsafe_b64encode(json.dumps(job, separators=(",", ":")).encode()).decode()
    reply.workunits.append(
        Workunit(
            name=workunit_name(job_id),
            app=version.app,
            inputs=inputs,
            command_line=f"--job {encoded}",
            rsc_fpops_est=runtime * 1e9,
            # the wrapper enforces the time limit itself; BOINC's bound is a generous backstop
            rsc_fpops_bound=runtime * 1e9 * 40,
            rsc_memory_bound=float(resources.get("memory_mb", 512)) * 2**20,
            rsc_disk_bound=float(resources.get("disk_mb", 256)) * 2**20,
        )
    )
    reply.results.append(
        Result(
            name=result_name(job_id, task_id),
            workunit=workunit_name(job_id),
            report_deadline=int(deadline.timestamp()),
            outputs=tuple(
                OutputFile(
                    name=project.signer.output_name(job_id, task_id, n, int(o["max_size"])),
                    open_name=o["name"],
                    upload_url=project.upload_url,
                    max_nbytes=int(o["max_size"]),
                )
                for n, o in enumerate(spec["outputs"])
            ),
        )
    )


def _input(conn: Connection, rpc: Rpc, sha256: str) -> tuple[int, str]:
    """An input's size and MD5. Inputs are content-addressed, so both are remembered per process."""
    known = rpc.project.inputs.get(sha256)
    if known is None:
        row = _INPUT.one(conn, {"sha256": sha256})
        known = (int(row.size), _input_md5(conn, rpc.inputs, row))
        if len(rpc.project.inputs) >= INPUT_CACHE_ENTRIES:
            rpc.project.inputs.clear()
        rpc.project.inputs[sha256] = known
    return known


def _input_md5(conn: Connection, inputs: Storage, row: Any) -> str:
    """BOINC clients verify inputs by MD5; the cache keeps adler32 and sha256, so compute it once."""
    if row.md5:
        return str(row.md5)
    path = inputs.local_path(input_key(row.sha256))
    if path is None:
        raise RuntimeError(f"input {row.sha256} is not in local storage")
    md5 = file_md5_hex(path)
    conn.execute(update(_F).where(_F.c.id == row.id).values(md5=md5))
    return md5


_READY_WORK = select(exists().where(_T.c.state == TaskState.READY.value))


def _send_pilots(
    conn: Connection,
    rpc: Rpc,
    host_id: int,
    req: SchedulerRequest,
    in_progress: int,
    now: datetime,
    reply: SchedulerReply,
) -> int:
    """Vacuum model: one pilot per idle core while tasks wait; the agent it starts pulls them itself."""
    settings = rpc.project.settings
    platforms = [p for p in (req.platform_name, *req.alternate_platforms) if p]
    version = rpc.project.version_for(settings.boinc_vacuum_app, platforms)
    if version is None:
        reply.messages.append(
            Message(f"No signed version of {settings.boinc_vacuum_app} for {req.platform_name} yet.")
        )
        return 0
    slots = min(MAX_SLOTS, req.host.p_ncpus - in_progress)
    if slots <= 0:
        return 0
    if not conn.execute(_READY_WORK).scalar():
        reply.request_delay = float(settings.retry_after_s)
        reply.messages.append(Message("no work for this host right now"))
        return 0
    reply.app_versions.append((version, rpc.project.app_base_url(version)))
    deadline = int((now + timedelta(hours=settings.boinc_pilot_hours)).timestamp())
    seconds = settings.boinc_pilot_hours * 3600
    command_line = f"--vacuum --hours {settings.boinc_pilot_hours:g}"
    for _ in range(slots):
        name = pilot_name(host_id)
        reply.workunits.append(
            Workunit(name=name, app=version.app, inputs=(), command_line=command_line,
                     rsc_fpops_est=seconds * 1e9 / 4, rsc_fpops_bound=seconds * 1e9 * 40)
        )  # fmt: skip
        reply.results.append(Result(name=name, workunit=name, report_deadline=deadline, outputs=()))
    return slots


def _pilot_credentials(conn: Connection, rpc: Rpc, volunteer_id: int, now: datetime) -> Grant:
    """What a pilot's agent logs in with, besides the gateway's URL: a fresh access token of this
    volunteer (compute scopes only, short-lived, recorded and revoked like any other), recorded here and
    signed once committed. It reaches the client in the project-specific preferences, which the client
    also rewrites in running pilots."""
    settings = rpc.project.settings
    grant = rpc.issuer.grant(
        volunteer_id, list(COMPUTE_SCOPES), now, timedelta(seconds=settings.access_token_ttl_s)
    )
    record_credential(conn, grant, "access", volunteer_id)
    return grant
