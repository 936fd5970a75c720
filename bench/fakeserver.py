"""A stand-in for the Airlock server that answers the volunteer cycle with canned replies, used only to
measure what the load generator itself can do (`loadgen_selftest.py`).

Two kinds: `raw`, a bare asyncio protocol on uvloop that costs the server next to nothing per request (so
the generator is the bottleneck), and `fastapi`, the same endpoints as a FastAPI app under uvicorn (what the
framework alone costs, without any Airlock logic).

    python bench/fakeserver.py --kind raw --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request, Response

_COUNTER = itertools.count(1)
_TOKEN = "eyJhbGciOiJFUzI1NiJ9." + "x" * 380 + "." + "y" * 86  # about the size of an ES256 upload token
_TASK_PATH = re.compile(r"^/api/v1/tasks/(\d+)/report$")


def work_reply(public_url: str) -> dict[str, Any]:
    task_id = next(_COUNTER)
    return {
        "tasks": [
            {
                "task_id": task_id,
                "job_id": task_id,
                "app": None,
                "command": ["sh", "-c", "cat in.txt > out.txt"],
                "env": {},
                "inputs": [
                    {
                        "name": "in.txt",
                        "url": f"{public_url}/api/v1/inputs/{'a' * 64}",
                        "size": 20,
                        "adler32": "0a1b2c3d",
                        "sha256": "a" * 64,
                    }
                ],
                "outputs": [
                    {
                        "name": "out.txt",
                        "max_size": 1_000_000,
                        "upload_url": f"{public_url}/quarantine/1/{task_id}/out.txt",
                    }
                ],
                "resources": {"cores": 1, "memory_mb": 512, "disk_mb": 256, "runtime_s": 3600},
                "lease_expires_at": "2030-01-01T00:10:00Z",
                "deadline": "2030-01-02T00:00:00Z",
                "heartbeat_interval_s": 60,
                "upload_token": _TOKEN,
            }
        ],
        "retry_after_s": 30,
        "message": None,
    }


def route(method: str, path: str, public_url: str) -> tuple[int, bytes]:
    if method == "GET" and path == "/healthz":
        return 200, b'{"status":"ok"}'
    if method == "POST" and path == "/api/v1/work":
        return 200, json.dumps(work_reply(public_url)).encode()
    if method == "PUT" and path.startswith("/quarantine/"):
        doc = {"path": path, "size": 40, "adler32": "0a1b2c3d", "sha256": "b" * 64}
        return 201, json.dumps(doc).encode()
    m = _TASK_PATH.match(path)
    if method == "POST" and m:
        return 200, json.dumps({"task_id": int(m.group(1)), "state": "reported"}).encode()
    return 404, b'{"error":"not_found","message":"no such endpoint"}'


_REASONS = {200: b"OK", 201: b"Created", 404: b"Not Found"}


class RawHTTP(asyncio.Protocol):
    def __init__(self, public_url: str) -> None:
        self.public_url = public_url
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                if line[:15].lower() == "content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            method, path, _ = head.split(" ", 2)
            status, body = route(method, path, self.public_url)
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (status, _REASONS[status], len(body), body)
            )


def fastapi_app(public_url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/{path:path}", methods=["POST", "PUT"])
    async def anything(path: str, request: Request) -> Response:
        await request.body()
        status, body = route(request.method, "/" + path, public_url)
        return Response(body, status_code=status, media_type="application/json")

    return app


def asgi_app(public_url: str) -> Any:
    """The same canned replies as a bare ASGI callable (no framework): the server stack's own cost."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        status, body = route(scope["method"], scope["path"], public_url)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def asgi_app_from_env() -> Any:
    return asgi_app(os.environ["FAKESERVER_PUBLIC_URL"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["raw", "fastapi", "asgi", "asgi-granian"], default="raw")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    public_url = f"http://127.0.0.1:{args.port}"
    if args.kind == "asgi-granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        os.environ["FAKESERVER_PUBLIC_URL"] = public_url
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        Server(
            "fakeserver:asgi_app_from_env",
            address="127.0.0.1",
            port=args.port,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            log_access=False,
            workers=1,
            factory=True,
        ).serve()
        return
    if args.kind == "asgi":
        import uvicorn

        uvicorn.run(
            asgi_app(public_url), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
        )
        return
    if args.kind == "fastapi":
        import uvicorn

        uvicorn.run(
            fastapi_app(public_url), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
        )
        return
    import uvloop

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RawHTTP(public_url), "127.0.0.1", args.port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
