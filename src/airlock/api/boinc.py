"""The BOINC project's HTTP face, under `<public_url>/boinc/` (the project URL clients attach to).

Thin: each route hands the request to `airlock.boinc`. The scheduler RPC runs its one transaction on the
event loop, like the native hot routes (see `api/volunteer.py`); password checks, checksums and file
sending go to threads.
"""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse

from airlock.api.deps import GatewayDep
from airlock.boinc import pages
from airlock.boinc.project import BoincProject
from airlock.boinc.protocol import (
    MAX_REQUEST_BYTES,
    BoincProtocolError,
    SchedulerRequest,
    parse_scheduler_request,
)
from airlock.boinc.reply import Message, SchedulerReply, render_reply
from airlock.boinc.scheduler import Answer, Rpc, handle_request, signed_reply
from airlock.boinc.upload import UploadHandler
from airlock.context import Gateway
from airlock.core.errors import NotFound, Unauthorized
from airlock.credentials.accounts import lookup_boinc_account
from airlock.db.engine import run_write
from airlock.generator.inputs import input_key

router = APIRouter(prefix="/boinc", tags=["boinc"])
XML = "text/xml"
_projects: dict[int, BoincProject] = {}  # by id() of the gateway's settings (checked by identity)
BAD_REQUEST_DELAY_S = 600.0


def project(gw: Gateway) -> BoincProject:
    """This process's BoincProject for the gateway (one dictionary look-up on every RPC)."""
    found = _projects.get(id(gw.settings))
    if found is None or found.settings is not gw.settings:
        found = _projects[id(gw.settings)] = BoincProject.open(gw.settings)
    return found


@router.get("/", response_class=HTMLResponse)
async def master(gw: GatewayDep) -> HTMLResponse:
    """The master page: names the scheduler."""
    return HTMLResponse(pages.master_page(project(gw)))


def parse_rpc(gw: Gateway, body: bytes | None) -> SchedulerRequest | bytes:
    """The scheduler request in a body (None: the body was over the size limit), or, when it is not
    one, the whole reply: a request we cannot serve still gets a scheduler reply, with a message the
    client shows the volunteer and a delay before it asks again."""
    try:
        if body is None:
            raise BoincProtocolError(f"the scheduler request is over {MAX_REQUEST_BYTES} bytes")
        return parse_scheduler_request(body)
    except BoincProtocolError as exc:
        reply = SchedulerReply(
            gw.settings.boinc_project_name,
            project(gw).master_url,
            request_delay=BAD_REQUEST_DELAY_S,
            messages=[Message(f"Scheduler request refused: {exc}", "high")],
        )
        return render_reply(reply)


def answer_rpc(gw: Gateway, req: SchedulerRequest) -> Answer:
    """A scheduler request's one transaction (run by `run_write`); `rpc_reply` makes the reply."""
    return handle_request(gw.engine, Rpc(project(gw), gw.issuer, gw.inputs), req)


def rpc_reply(gw: Gateway, answer: Answer) -> bytes:
    """The XML reply of a committed RPC (signed and rendered outside the transaction)."""
    return render_reply(signed_reply(answer, gw.issuer))


async def _body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None once it is over `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


async def scheduler(request: Request) -> Response:
    """A scheduler RPC: report results, get work (`parse_rpc`, then `answer_rpc` in its one transaction).

    A plain Starlette route (added in `api.app`), and `airlock serve` answers it before FastAPI even
    sees the request (`api.hot`): at a thousand RPCs a second the framework's layers cost more than
    the RPC's own database work."""
    gw: Gateway = request.app.state.gateway
    req = parse_rpc(gw, await _body(request, MAX_REQUEST_BYTES))
    if isinstance(req, bytes):
        return Response(req, media_type=XML)
    answer = await run_write(gw.engine, lambda: answer_rpc(gw, req))
    return Response(rpc_reply(gw, answer), media_type=XML)


@router.get("/download/{mac}/{sha256}", response_class=FileResponse)
def download(gw: GatewayDep, mac: str, sha256: str) -> FileResponse:
    """An input file, at the address the scheduler signed (Range requests resume a download)."""
    if len(sha256) != 64 or not project(gw).signer.check_input(mac, sha256):
        raise NotFound("no such file")
    path = gw.inputs.local_path(input_key(sha256))
    if path is None or not path.is_file():
        raise NotFound("no such file")
    return FileResponse(path, media_type="application/octet-stream")


@router.get("/apps/{app}/{version}/{platform}/{name}", response_class=FileResponse)
def app_file(gw: GatewayDep, app: str, version: int, platform: str, name: str) -> FileResponse:
    """A signed app file (public, as in every BOINC project; the client checks the signature)."""
    path = project(gw).app_file(app, version, platform, name)
    if path is None:
        raise NotFound("no such app file")
    return FileResponse(path, media_type="application/octet-stream")


@router.post("/file_upload_handler")
async def file_upload_handler(gw: GatewayDep, request: Request) -> Response:
    """Output uploads and `get_file_size` queries (always HTTP 200; the status is in the XML)."""
    p = project(gw)
    handler = UploadHandler(
        gw.engine, gw.quarantine, p.signer, p.upload_staging, gw.settings.boinc_max_upload_bytes
    )
    length = request.headers.get("content-length")
    body = await handler.handle(request.stream(), int(length) if length and length.isdigit() else None)
    return Response(body, media_type=XML)


@router.get("/lookup_account.php")
async def lookup_account(
    gw: GatewayDep,
    email_addr: Annotated[str, Query(max_length=254)] = "",
    passwd_hash: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    """The account key for an e-mail address and BOINC's password hash (md5 of password + e-mail)."""
    if not email_addr or not passwd_hash:
        return Response(
            pages.error(pages.ERR_BAD_PASSWD, "e-mail address and password needed"), media_type=XML
        )
    try:
        authenticator = await anyio.to_thread.run_sync(
            lookup_boinc_account, gw.engine, email_addr, passwd_hash.lower()
        )
    except Unauthorized:
        return Response(
            pages.error(pages.ERR_DB_NOT_FOUND, "no account with this e-mail address and password"),
            media_type=XML,
        )
    return Response(pages.account_out(authenticator), media_type=XML)


@router.get("/get_project_config.php")
async def get_project_config(gw: GatewayDep) -> Response:
    return Response(pages.project_config(project(gw)), media_type=XML)
