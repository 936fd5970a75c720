"""A deliberately minimal HTTP/1.1 keep-alive client for the benchmarks.

The machine running the benchmarks has two cores shared by the server under test and the load generator,
so the generator must cost as little CPU per request as possible: httpx spends ~0.5-1 ms of CPU per request,
this client spends a few tens of microseconds (see `bench/loadgen_selftest.py`).

Scope: one request in flight per connection (no pipelining), request bodies sent whole with
`Content-Length`, responses framed by `Content-Length` or `Transfer-Encoding: chunked` (bodies that end at
connection close are not supported). Interim `1xx` responses are skipped.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

__all__ = [
    "Connection",
    "HTTPProtocolError",
    "Response",
    "build_request",
    "install_fast_loop",
    "percentile",
]


class HTTPProtocolError(ConnectionError):
    """The server sent something this client does not understand, or the connection broke."""


@dataclass(slots=True)
class Response:
    status: int
    head: bytes  # status line and header block, without the final blank line
    body: bytes

    def header(self, name: str) -> str | None:
        """Value of the first header called `name` (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1") + b":"
        for line in self.head.split(b"\r\n")[1:]:
            if line[: len(wanted)].lower() == wanted:
                return line[len(wanted) :].strip().decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def text(self, limit: int = 500) -> str:
        return self.body[:limit].decode("utf-8", "replace")


def build_request(
    method: str,
    path: str,
    host: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """Serialise a whole request. Callers on the hot path pre-build the constant parts themselves."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{k}: {v}" for k, v in items)
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_CL = b"\r\ncontent-length:"
_TE_CHUNKED = b"\r\ntransfer-encoding: chunked"
_CONN_CLOSE = b"\r\nconnection: close"


class _ClientProtocol(asyncio.Protocol):
    """Parses responses as bytes arrive and hands each whole one to the single waiting request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.keep_alive = True
        # parser state of the response being read
        self._head: bytes | None = None
        self._status = 0
        self._need = 0  # body bytes still expected (Content-Length framing)
        self._chunked = False
        self._chunks = bytearray()

    # ---------------------------------------------------------------------------------- asyncio hooks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(HTTPProtocolError(f"unparseable response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HTTPProtocolError(f"connection closed by server{f': {exc}' if exc else ''}"))

    # ----------------------------------------------------------------------------------------- parser
    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self._head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                status = int(head[9:12])
                if 100 <= status < 200:
                    continue  # interim response (100 Continue): the real one follows
                lower = head.lower()
                self._head = head
                self._status = status
                self.keep_alive = _CONN_CLOSE not in lower
                i = lower.find(_CL)
                if i >= 0:
                    j = lower.find(b"\r\n", i + 2)
                    self._need = int(head[i + len(_CL) : j if j >= 0 else len(head)])
                    self._chunked = False
                elif _TE_CHUNKED in lower:
                    self._chunked = True
                    self._chunks = bytearray()
                elif status in (204, 304):
                    self._need = 0
                    self._chunked = False
                else:
                    raise ValueError("response without Content-Length or chunked encoding")
            if self._chunked:
                body = self._read_chunks()
                if body is None:
                    return
            else:
                if len(buf) < self._need:
                    return
                body = bytes(buf[: self._need])
                del buf[: self._need]
            response = Response(self._status, self._head, body)
            self._head = None
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(response)

    def _read_chunks(self) -> bytes | None:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return None
            size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            if size == 0:
                # last chunk, then optional trailers, then a blank line
                end = buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    return None
                del buf[: end + 4]
                body = bytes(self._chunks)
                self._chunks = bytearray()
                return body
            if len(buf) < eol + 2 + size + 2:
                return None
            self._chunks += buf[eol + 2 : eol + 2 + size]
            del buf[: eol + 2 + size + 2]


class Connection:
    """One keep-alive connection to host:port that reconnects by itself after the server closes it.

    `timeout` (seconds) bounds each request; None (the default) sets no timer per request, which is
    cheaper: the benchmark bounds a whole phase instead."""

    def __init__(self, host: str, port: int, timeout: float | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.authority = f"{host}:{port}"
        self._proto: _ClientProtocol | None = None
        self.connects = 0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _transport, proto = await loop.create_connection(lambda: _ClientProtocol(loop), self.host, self.port)
        self._proto = proto
        self.connects += 1

    async def send(self, raw: bytes, timeout: float | None = None) -> Response:
        """Send one whole serialised request and wait for its response."""
        proto = self._proto
        if proto is None or proto.closed or not proto.keep_alive:
            self.close()
            await self.connect()
            proto = self._proto
            assert proto is not None
        transport = proto.transport
        assert transport is not None
        loop = proto.loop
        waiter: asyncio.Future[Response] = loop.create_future()
        proto.waiter = waiter
        transport.write(raw)
        timeout = timeout if timeout is not None else self.timeout
        if timeout is None:  # the hot path: the benchmark bounds its phases as a whole instead
            return await waiter
        timer = loop.call_later(timeout, _expire, waiter, transport)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> Response:
        return await self.send(build_request(method, path, self.authority, headers, body), timeout)

    async def request_json(
        self,
        method: str,
        path: str,
        document: Any = None,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Response:
        headers: list[tuple[str, str]] = []
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        body = b""
        if document is not None:
            body = json.dumps(document, separators=(",", ":")).encode()
            headers.append(("Content-Type", "application/json"))
        return await self.request(method, path, body, headers, timeout)

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


def _expire(waiter: asyncio.Future[Response], transport: asyncio.Transport) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response before the timeout"))
        transport.close()  # the late response must not be taken as the answer to the next request


def install_fast_loop() -> str:
    """Use uvloop when it is installed (it comes with uvicorn[standard]); returns the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {uvloop.__version__}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
