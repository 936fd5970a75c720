"""Volunteer endpoints: register, log in, register a host, request work, heartbeat, report.

The hot routes (work, heartbeat, report, host registration) are `async def` and run their one short
transaction on the event loop itself: measured here, handing a request to the thread pool and back costs
more CPU (~0.3-0.5 ms, thread wake-ups and GIL hand-overs) than the transaction (~0.2 ms on SQLite),
and it is the CPU that bounds how many volunteers one gateway process serves. Anything slow stays in
the thread pool: password hashing (register, login), file responses."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, status
from fastapi.responses import FileResponse

from airlock.api.deps import GatewayDep, PathId, Reader, Volunteer
from airlock.context import Gateway
from airlock.core.errors import Forbidden, NotFound
from airlock.core.schemas import (
    Heartbeat,
    HeartbeatReply,
    HostRegistered,
    HostRegistration,
    Login,
    ReportAccepted,
    TaskReport,
    TokenResponse,
    VolunteerRegistration,
    VolunteerView,
    WorkReply,
    WorkRequest,
)
from airlock.credentials import accounts
from airlock.credentials.accounts import require_active
from airlock.credentials.tokens import Claims
from airlock.db.engine import hot_begin, run_write
from airlock.generator.inputs import input_key, lookup_input
from airlock.scheduler.dispatch import WorkGrant, register_host, request_work, work_reply
from airlock.scheduler.leases import Renewal, heartbeat, heartbeat_reply
from airlock.scheduler.report import report_task

router = APIRouter(prefix="/api/v1", tags=["volunteer"])


@router.post("/volunteers/register", status_code=status.HTTP_201_CREATED)
def register(gw: GatewayDep, body: VolunteerRegistration) -> VolunteerView:
    """Open registration (when the operator turned it on)."""
    if not gw.settings.open_registration:
        raise Forbidden("registration is closed on this gateway; ask the operator for an account")
    with gw.engine.begin() as conn:
        return accounts.register_volunteer(
            conn, body.name, body.password, body.email, actor="self-registration"
        )


@router.post("/auth/token")
def token(gw: GatewayDep, body: Login) -> TokenResponse:
    """Exchange a user name and password for a short-lived access token (WLCG JWT, compute scopes)."""
    ttl = timedelta(seconds=gw.settings.access_token_ttl_s)
    issued = accounts.login(gw.engine, gw.issuer, body.username, body.password, ttl)
    return TokenResponse(access_token=issued.token, expires_in=int(ttl.total_seconds()), scope=issued.scope)


@router.post("/hosts", status_code=status.HTTP_201_CREATED)
async def hosts(gw: GatewayDep, who: Volunteer, body: HostRegistration) -> HostRegistered:
    with gw.engine.begin() as conn:
        return register_host(conn, gw.settings, who.volunteer_id, body)


# The operations behind the hot routes, shared by these FastAPI routes (the OpenAPI document, and any
# request the front in `api.hot` passes on) and by that front itself. Each is the request's one write
# transaction (run by `run_write`) and, for work and heartbeats, the reply made once it is committed:
# the upload tokens are signed there, outside the transaction.
def work_for(gw: Gateway, who: Claims, body: WorkRequest) -> WorkGrant:
    with hot_begin(gw.engine) as conn:
        return request_work(conn, gw.settings, gw.issuer, who.volunteer_id, body)


def work_done(gw: Gateway, grant: WorkGrant) -> WorkReply:
    return work_reply(gw.settings, gw.issuer, grant)


def heartbeat_for(gw: Gateway, who: Claims, task_id: int, body: Heartbeat) -> Renewal:
    with hot_begin(gw.engine) as conn:
        return heartbeat(conn, gw.settings, who.volunteer_id, body.host_id, task_id, gw.issuer)


def heartbeat_done(gw: Gateway, renewal: Renewal) -> HeartbeatReply:
    return heartbeat_reply(gw.issuer, renewal)


def report_for(gw: Gateway, who: Claims, task_id: int, body: TaskReport) -> ReportAccepted:
    with hot_begin(gw.engine) as conn:
        return report_task(conn, who.volunteer_id, task_id, body)


@router.post("/work")
async def work(gw: GatewayDep, who: Volunteer, body: WorkRequest) -> WorkReply:
    return work_done(gw, await run_write(gw.engine, lambda: work_for(gw, who, body)))


@router.post("/tasks/{task_id}/heartbeat")
async def task_heartbeat(gw: GatewayDep, who: Volunteer, task_id: PathId, body: Heartbeat) -> HeartbeatReply:
    return heartbeat_done(gw, await run_write(gw.engine, lambda: heartbeat_for(gw, who, task_id, body)))


@router.post("/tasks/{task_id}/report")
async def task_report(gw: GatewayDep, who: Volunteer, task_id: PathId, body: TaskReport) -> ReportAccepted:
    return await run_write(gw.engine, lambda: report_for(gw, who, task_id, body))


@router.get("/inputs/{sha256}", response_class=FileResponse)
def get_input(gw: GatewayDep, who: Reader, sha256: str) -> FileResponse:
    """An input file from the content-addressed cache (inputs are not secret; they still need a token)."""
    with gw.engine.begin() as conn:
        if isinstance(who, Claims):
            require_active(conn, who.volunteer_id)
        digest = lookup_input(conn, sha256)
    path = gw.inputs.local_path(input_key(digest.sha256))
    if path is None or not path.is_file():
        raise NotFound(f"input {sha256} is registered but missing from storage")
    return FileResponse(
        path, media_type="application/octet-stream", headers={"Digest": f"adler32={digest.adler32}"}
    )
