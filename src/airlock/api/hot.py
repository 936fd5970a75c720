"""The ASGI front of `airlock serve`: the BOINC scheduler RPC goes straight to its handler, everything
else to the FastAPI application.

At a thousand scheduler RPCs a second on two cores, FastAPI's and Starlette's layers (five middlewares,
route matching over every route, request and response objects) cost about a third of an RPC. This front
reads the body, calls the same `rpc_reply` as the FastAPI route (which the in-process tests and the
OpenAPI document use), and writes the reply. Errors become a 500, which BOINC clients retry later.
"""

from __future__ import annotations

import logging
from typing import Any

from airlock.api.boinc import XML, rpc_reply
from airlock.boinc.protocol import MAX_REQUEST_BYTES
from airlock.context import Gateway

log = logging.getLogger("airlock.api")
SCHEDULER_PATH = "/boinc/cgi"

Scope = dict[str, Any]
Message = dict[str, Any]


class HotRoutes:
    def __init__(self, app: Any, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.state = getattr(app, "state", None)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == SCHEDULER_PATH and scope["method"] == "POST":
            await self._scheduler(receive, send)
            return
        await self.app(scope, receive, send)

    async def _scheduler(self, receive: Any, send: Any) -> None:
        body: bytes | None = b""
        buf = bytearray()
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return
            buf += message.get("body", b"")
            if len(buf) > MAX_REQUEST_BYTES:
                body = None
                break
            if not message.get("more_body", False):
                body = bytes(buf)
                break
        try:
            reply, status, kind = rpc_reply(self.gw, body), 200, XML
        except Exception:
            log.exception("scheduler RPC failed")
            reply, status, kind = b"scheduler error; try again later\n", 500, "text/plain"
        headers = [(b"content-type", kind.encode()), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reply})
