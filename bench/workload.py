"""The simulated volunteer hosts and the baseline clients, shared by `dispatch.py` and the generator's
self-test (`loadgen_selftest.py`), so the self-test measures exactly the code the benchmark runs."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from time import perf_counter
from urllib.parse import urlsplit

from airlock.core.checksums import digest_bytes, format_digest_header
from loadgen import Connection, HTTPProtocolError, Response, percentile

ENDPOINTS = ("work", "upload", "report")
MAX_ERROR_SAMPLES = 8
_TRANSPORT_ERRORS = (HTTPProtocolError, ConnectionError, TimeoutError, OSError)


@dataclass
class EndpointStats:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests done in the window
    errors: int = 0

    def summary(self, seconds: float) -> dict[str, float | int]:
        lat = sorted(self.latencies)
        return {
            "requests": len(lat),
            "requests_per_s": len(lat) / seconds,
            "errors": self.errors,
            "p50_ms": percentile(lat, 50) * 1e3,
            "p90_ms": percentile(lat, 90) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        }


@dataclass
class PhaseStats:
    """What one timed phase saw. Only events that finish inside [start, end] are counted."""

    start: float
    end: float
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    cycles: list[float] = field(default_factory=list)  # whole-cycle latencies, seconds
    empty_work: int = 0  # work requests answered with no task (the server ran out of jobs)
    transport_errors: int = 0
    hung_clients: int = 0  # clients cancelled because a response never came
    error_samples: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def endpoint(self, name: str) -> EndpointStats:
        ep = self.endpoints.get(name)
        if ep is None:
            ep = self.endpoints[name] = EndpointStats()
        return ep

    @property
    def errors(self) -> int:
        return sum(ep.errors for ep in self.endpoints.values()) + self.hung_clients

    def http_error(self, endpoint: str, response: Response) -> None:
        self.endpoint(endpoint).errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{endpoint}: HTTP {response.status} {response.text(400)}")

    def transport_error(self, endpoint: str, exc: BaseException) -> None:
        self.endpoint(endpoint).errors += 1
        self.transport_errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{endpoint}: {type(exc).__name__}: {exc}")


@dataclass
class Host:
    """One simulated volunteer host with its own keep-alive connection and access token."""

    index: int
    volunteer_id: int
    host_id: int
    token: str
    conn: Connection
    base_url: str  # the server's public URL; upload URLs under it are sent to this connection
    work_request: bytes = b""
    foreign_upload_hosts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        body = json.dumps({"host_id": self.host_id, "slots": 1}, separators=(",", ":")).encode()
        self.work_request = (
            f"POST /api/v1/work HTTP/1.1\r\nHost: {self.conn.authority}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def upload_path(self, url: str) -> str:
        if url.startswith("/"):
            return url
        if url.startswith(self.base_url + "/"):
            return url[len(self.base_url) :]
        parts = urlsplit(url)
        self.foreign_upload_hosts.add(parts.netloc)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def upload_request(self, url: str, upload_token: str, data: bytes) -> bytes:
        d = digest_bytes(data)
        return (
            f"PUT {self.upload_path(url)} HTTP/1.1\r\nHost: {self.conn.authority}\r\n"
            f"Authorization: Bearer {upload_token}\r\nContent-Type: application/octet-stream\r\n"
            f"Digest: {format_digest_header(d.adler32, d.sha256)}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data

    def report_request(self, task_id: int, name: str, data: bytes) -> bytes:
        d = digest_bytes(data)
        body = json.dumps(
            {
                "host_id": self.host_id,
                "exit_code": 0,
                "cpu_time_s": 0.01,
                "wall_time_s": 0.01,
                "outputs": [{"name": name, "size": d.size, "adler32": d.adler32, "sha256": d.sha256}],
            },
            separators=(",", ":"),
        ).encode()
        return (
            f"POST /api/v1/tasks/{task_id}/report HTTP/1.1\r\nHost: {self.conn.authority}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


def output_bytes(task_id: int) -> bytes:
    """A small output, different for every task (as real results are)."""
    return b"airlock bench result of task %d: ok\n" % task_id


async def run_cycles(host: Host, stats: PhaseStats, empty_wait_s: float = 0.02) -> None:
    """Full volunteer cycles until `stats.end`: request work, upload the output, report.
    A cycle that is under way at the end is finished but not counted."""
    conn = host.conn
    end = stats.end
    work_stats = stats.endpoint("work")
    upload_stats = stats.endpoint("upload")
    report_stats = stats.endpoint("report")
    while True:
        t0 = perf_counter()
        if t0 >= end:
            return
        # 1. request work
        try:
            r = await conn.send(host.work_request)
        except _TRANSPORT_ERRORS as exc:
            stats.transport_error("work", exc)
            await asyncio.sleep(0.05)
            continue
        t1 = perf_counter()
        if r.status != 200:
            stats.http_error("work", r)
            await asyncio.sleep(0.01)
            continue
        if t1 <= end:
            work_stats.latencies.append(t1 - t0)
        tasks = json.loads(r.body)["tasks"]
        if not tasks:
            stats.empty_work += 1
            await asyncio.sleep(empty_wait_s)
            continue
        task = tasks[0]
        task_id: int = task["task_id"]
        out = task["outputs"][0]
        data = output_bytes(task_id)
        # 2. upload the output to the data bridge
        try:
            r = await conn.send(host.upload_request(out["upload_url"], task["upload_token"], data))
        except _TRANSPORT_ERRORS as exc:
            stats.transport_error("upload", exc)
            await asyncio.sleep(0.05)
            continue
        t2 = perf_counter()
        if not r.ok:
            stats.http_error("upload", r)
            await asyncio.sleep(0.01)
            continue
        if t2 <= end:
            upload_stats.latencies.append(t2 - t1)
        # 3. report
        try:
            r = await conn.send(host.report_request(task_id, out["name"], data))
        except _TRANSPORT_ERRORS as exc:
            stats.transport_error("report", exc)
            await asyncio.sleep(0.05)
            continue
        t3 = perf_counter()
        if not r.ok:
            stats.http_error("report", r)
            await asyncio.sleep(0.01)
            continue
        if t3 <= end:
            report_stats.latencies.append(t3 - t2)
            stats.cycles.append(t3 - t0)


async def run_healthz(conn: Connection, stats: PhaseStats) -> None:
    """The baseline client: GET /healthz back to back on one keep-alive connection."""
    raw = f"GET /healthz HTTP/1.1\r\nHost: {conn.authority}\r\n\r\n".encode()
    ep = stats.endpoint("healthz")
    end = stats.end
    while True:
        t0 = perf_counter()
        if t0 >= end:
            return
        try:
            r = await conn.send(raw)
        except _TRANSPORT_ERRORS as exc:
            stats.transport_error("healthz", exc)
            await asyncio.sleep(0.05)
            continue
        t1 = perf_counter()
        if r.status != 200:
            stats.http_error("healthz", r)
            await asyncio.sleep(0.01)
            continue
        if t1 <= end:
            ep.latencies.append(t1 - t0)


def cycle_summary(stats: PhaseStats) -> dict[str, float | int]:
    lat = sorted(stats.cycles)
    n = len(lat)
    return {
        "cycles": n,
        "cycles_per_s": n / stats.seconds,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
    }
