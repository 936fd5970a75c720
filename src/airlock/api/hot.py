"""The ASGI front of `airlock serve`: the busiest routes go straight to their handlers, everything else
to the FastAPI application.

At a thousand requests a second on two cores, FastAPI's and Starlette's layers (middlewares, route
matching over every route, dependency injection, request and response objects) cost about as much as
a request's own database work. This front serves, with a bearer token:

* `POST /boinc/cgi` (the BOINC scheduler RPC, any client),
* `POST /api/v1/work`, `POST /api/v1/tasks/{id}/heartbeat`, `POST /api/v1/tasks/{id}/report`,
* `PUT /quarantine/{volunteer}/{task}/{name}` (the embedded data bridge),

by calling the same functions as the FastAPI routes (which stay the OpenAPI document and serve every
other shape of request: no token, X.509 client certificates, ids out of range), validating bodies with
the same pydantic models and answering errors as `api.errors` renders them for both layers. Anything
unexpected becomes a 500 (BOINC clients and agents retry later).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from airlock.api import errors
from airlock.api.boinc import XML, answer_rpc, parse_rpc, rpc_reply
from airlock.api.volunteer import heartbeat_done, heartbeat_for, report_for, work_done, work_for
from airlock.boinc.protocol import MAX_REQUEST_BYTES
from airlock.bridge.quarantine import receive_upload
from airlock.context import Gateway
from airlock.core.errors import TooLarge
from airlock.core.schemas import INT32, Heartbeat, TaskReport, WorkRequest
from airlock.credentials.tokens import Claims
from airlock.db.engine import run_write

log = logging.getLogger("airlock.api")
SCHEDULER_PATH = "/boinc/cgi"
MAX_JSON_BYTES = 4 * 2**20  # a report's 64 KiB stderr tail, escaped, fits many times over

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ID = r"([1-9][0-9]{0,9})"
_TASK_CALL = re.compile(rf"/api/v1/tasks/{_ID}/(heartbeat|report)")
_UPLOAD = re.compile(rf"/quarantine/{_ID}/{_ID}/([^/]+)")
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)")


class Disconnected(Exception):
    """The client went away before its request body was complete."""


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it is over `limit` bytes."""
    buf = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        buf += message.get("body", b"")
        if len(buf) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(buf)


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def respond(send: Send, status: int, body: bytes, kind: str, extra: errors.Headers = None) -> None:
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, rendered: errors.Rendered) -> None:
    status, payload, headers = rendered
    await respond(send, status, errors.encode(payload), "application/json", headers)


def _ids(*groups: str) -> tuple[int, ...] | None:
    """Path ids, or None when one is out of range (FastAPI then answers the 422)."""
    ids = tuple(int(g) for g in groups)
    return ids if all(i <= INT32 for i in ids) else None


class HotRoutes:
    def __init__(self, app: Any, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.state = getattr(app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self._route(scope)
            if handler is not None:
                with contextlib.suppress(Disconnected):  # nothing to answer
                    await handler(receive, send)
                return
        await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> Callable[[Receive, Send], Awaitable[None]] | None:
        """The handler of a request this front serves, or None to pass it to FastAPI."""
        path, method = scope["path"], scope["method"]
        if path == SCHEDULER_PATH and method == "POST":
            return self._scheduler
        token = _bearer(scope)
        if token is None:
            return None
        gw = self.gw
        if method == "POST" and path == "/api/v1/work":
            return lambda r, s: self._json(
                r, s, token, WorkRequest, lambda who, b: work_for(gw, who, b), lambda g: work_done(gw, g)
            )
        if method == "POST" and (m := _TASK_CALL.fullmatch(path)) and (ids := _ids(m[1])):
            task_id = ids[0]
            if m[2] == "report":
                return lambda r, s: self._json(
                    r, s, token, TaskReport, lambda who, b: report_for(gw, who, task_id, b)
                )
            return lambda r, s: self._json(
                r,
                s,
                token,
                Heartbeat,
                lambda who, b: heartbeat_for(gw, who, task_id, b),
                lambda renewal: heartbeat_done(gw, renewal),
            )
        if method == "PUT" and (m := _UPLOAD.fullmatch(path)) and (ids := _ids(m[1], m[2])):
            volunteer_id, task_id = ids
            name = m[3]
            return lambda r, s: self._upload(r, s, scope, token, volunteer_id, task_id, name)
        return None

    async def _scheduler(self, receive: Receive, send: Send) -> None:
        body = await read_body(receive, MAX_REQUEST_BYTES)
        try:
            req = parse_rpc(self.gw, body)
            if isinstance(req, bytes):
                reply = req
            else:
                answer = await run_write(self.gw.engine, lambda: answer_rpc(self.gw, req))
                reply = rpc_reply(self.gw, answer)
            status, kind = 200, XML
        except Exception:
            log.exception("scheduler RPC failed")
            reply, status, kind = b"scheduler error; try again later\n", 500, "text/plain"
        await respond(send, status, reply, kind)

    async def _json(
        self,
        receive: Receive,
        send: Send,
        token: str,
        model: type[BaseModel],
        call: Callable[[Claims, Any], Any],
        done: Callable[[Any], BaseModel] | None = None,
    ) -> None:
        """A JSON request: `call` is its write transaction (run by `run_write`), `done` makes the reply
        from what it returned, once committed (without it, `call` returns the reply itself)."""
        body = await read_body(receive, MAX_JSON_BYTES)
        try:
            if body is None:
                raise TooLarge(f"the request body is over {MAX_JSON_BYTES} bytes")
            who = self.gw.issuer.verify_compute(token)
            if not body:
                await respond_error(send, errors.missing_body())
                return
            try:
                request = model.model_validate_json(body)
            except ValidationError as exc:
                await respond_error(send, errors.for_validation(exc.errors(), in_body=True))
                return
            result = await run_write(self.gw.engine, lambda: call(who, request))
            reply = done(result) if done is not None else result
        except Exception as exc:
            await self._fail(send, exc)
            return
        await respond(send, 200, reply.model_dump_json().encode(), "application/json")

    async def _upload(
        self,
        receive: Receive,
        send: Send,
        scope: Scope,
        token: str,
        volunteer_id: int,
        task_id: int,
        name: str,
    ) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            claims = self.gw.issuer.verify(token)
            receipt, created = await receive_upload(
                self.gw.engine,
                self.gw.quarantine,
                claims,
                volunteer_id,
                task_id,
                name,
                headers,
                body_chunks(receive),
            )
        except Disconnected:
            raise
        except Exception as exc:
            await self._fail(send, exc)
            return
        await respond(send, 201 if created else 200, receipt.model_dump_json().encode(), "application/json")

    async def _fail(self, send: Send, exc: Exception) -> None:
        rendered = errors.for_exception(exc)
        if rendered is None:
            log.exception("request failed", exc_info=exc)
            await respond(send, 500, b"Internal Server Error", "text/plain; charset=utf-8")
            return
        await respond_error(send, rendered)


def _bearer(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            m = _BEARER.fullmatch(value)
            return m[1].decode("latin-1") if m else None
    return None
