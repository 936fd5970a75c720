"""What one volunteer cycle costs the gateway itself, without HTTP: the floor under `dispatch.py`.

    python bench/cycle_cost.py [--cycles 3000] [--hosts 64] [--profile]

Builds a gateway on SQLite in a temporary folder (the embedded default), submits jobs and registers
`--hosts` volunteers with one host each, then drives the ASGI application `airlock serve` runs directly,
with no server and no sockets: `--hosts` coroutines each loop over work -> upload -> report, as
`dispatch.py`'s simulated hosts do, so the hot requests share commit groups as they do under load. The
background loops are off: this is the serving process's share of a cycle.

It reports the process's CPU a cycle (the simulated hosts' own small share included: building the
requests, hashing the output, decoding the replies), the calls into SQLite a cycle and the time SQLite's
C code takes for them (measured around each call on the driver connection), and the share of the cycle
that is SQLite's, all from the same run. Add about three `/healthz` requests' CPU (`dispatch.py` prints
it) for the HTTP layer. `--profile` prints the functions that take the most time under cProfile (which
slows the Python, not SQLite, so the SQLite share reads lower there).

Last line: `cycle_cost: <X> ms CPU a cycle, SQLite <Y> ms (<S>) in <N> calls`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reexec import ensure_venv

ensure_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

warnings.filterwarnings("ignore", message=".*starlette.testclient.*")  # set-up only; no HTTP is timed
from fastapi.testclient import TestClient  # noqa: E402

from airlock.api.server import serving_app  # noqa: E402
from airlock.config import load_settings  # noqa: E402
from airlock.context import Gateway, initialise  # noqa: E402
from airlock.core.checksums import digest_bytes, format_digest_header  # noqa: E402
from airlock.db import engine as db_engine  # noqa: E402
from airlock.db.migrate import upgrade  # noqa: E402
from harness import fresh_data_dir  # noqa: E402

OPERATOR_TOKEN = "cycle-cost-operator-token"
PASSWORD = "cycle cost password"
PUBLIC_URL = "http://gateway.invalid"


@dataclass
class SqliteClock:
    """Calls into SQLite on the gateway's driver connections, and the seconds they took."""

    calls: int = 0
    seconds: float = 0.0
    on: bool = False

    def install(self) -> None:
        clock = self
        c_execute = sqlite3.Connection.execute

        def execute(conn: sqlite3.Connection, *args: Any) -> sqlite3.Cursor:
            if not clock.on:
                return c_execute(conn, *args)
            t0 = time.perf_counter()
            try:
                return c_execute(conn, *args)
            finally:
                clock.seconds += time.perf_counter() - t0
                clock.calls += 1

        db_engine._WriterConnection.execute = execute  # type: ignore[method-assign,assignment]


def set_up(data_dir: Path, jobs: int, hosts: int) -> tuple[Gateway, Any, list[tuple[str, int]]]:
    settings = load_settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir}/airlock.db",
        operator_token=OPERATOR_TOKEN,
        public_url=PUBLIC_URL,
        background=False,
        daily_quota_per_core=10**9,
    )
    initialise(settings)
    gw = Gateway.open(settings)
    upgrade(gw.engine)
    app = serving_app(gw, background=False)
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    volunteers: list[tuple[str, int]] = []
    with TestClient(app, base_url=PUBLIC_URL) as client:
        spec = [
            {"name": f"j{i}", "command": ["true"], "outputs": [{"name": "out.txt", "max_size": 2**20}]}
            for i in range(jobs)
        ]
        for i in range(0, jobs, 5000):
            r = client.post("/api/v1/batches", json={"name": f"b{i}", "jobs": spec[i : i + 5000]}, headers=op)
            r.raise_for_status()
        for i in range(hosts):
            name = f"host{i}"
            client.post(
                "/api/v1/volunteers", json={"name": name, "password": PASSWORD}, headers=op
            ).raise_for_status()
            r = client.post("/api/v1/auth/token", json={"username": name, "password": PASSWORD})
            token = r.raise_for_status().json()["access_token"]
            r = client.post(
                "/api/v1/hosts",
                json={"platform": "x86_64-pc-linux-gnu", "cores": 4, "memory_mb": 8000, "disk_mb": 50_000},
                headers={"Authorization": f"Bearer {token}"},
            )
            volunteers.append((token, r.raise_for_status().json()["host_id"]))
    return gw, app, volunteers


async def call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
    """One request through the ASGI application; the decoded JSON reply (an error reply raises)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()]
        + [(b"content-length", str(len(body)).encode())],
        "scheme": "http",
        "server": ("gateway.invalid", 80),
        "client": ("127.0.0.1", 40000),
        "root_path": "",
        "state": {},
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    if status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {status} {b''.join(chunks)[:300]!r}")
    return json.loads(b"".join(chunks))


async def run_cycles(app: Any, volunteers: list[tuple[str, int]], cycles: int) -> int:
    done = 0

    async def host(token: str, host_id: int) -> None:
        nonlocal done
        auth = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        work = json.dumps({"host_id": host_id, "slots": 1}).encode()
        while done < cycles:
            tasks = (await call(app, "POST", "/api/v1/work", auth, work))["tasks"]
            if not tasks:
                raise RuntimeError("the gateway ran out of jobs")
            (task,) = tasks
            data = b"cycle cost result of task %d\n" % task["task_id"]
            d = digest_bytes(data)
            upload = {
                "authorization": f"Bearer {task['upload_token']}",
                "digest": format_digest_header(d.adler32, d.sha256),
            }
            await call(app, "PUT", task["outputs"][0]["upload_url"].removeprefix(PUBLIC_URL), upload, data)
            report = {
                "host_id": host_id,
                "exit_code": 0,
                "cpu_time_s": 0.01,
                "wall_time_s": 0.01,
                "outputs": [{"name": "out.txt", "size": d.size, "adler32": d.adler32, "sha256": d.sha256}],
            }
            await call(
                app, "POST", f"/api/v1/tasks/{task['task_id']}/report", auth, json.dumps(report).encode()
            )
            done += 1

    await asyncio.gather(*(host(token, host_id) for token, host_id in volunteers))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=3000, help="cycles to time (default 3000)")
    p.add_argument("--hosts", type=int, default=64, help="concurrent simulated hosts (default 64)")
    p.add_argument("--profile", action="store_true", help="print the top functions under cProfile")
    args = p.parse_args(argv)
    clock = SqliteClock()
    clock.install()
    tmp = fresh_data_dir("airlock-cycle-cost-")
    try:
        gw, app, volunteers = set_up(Path(tmp), args.cycles + 5 * args.hosts, args.hosts)
        try:
            asyncio.run(run_cycles(app, volunteers, min(args.hosts * 2, args.cycles)))  # warm-up
            profiler = cProfile.Profile() if args.profile else None
            clock.on = True
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            done = asyncio.run(run_cycles(app, volunteers, args.cycles))
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            clock.on = False
        finally:
            gw.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_cycle_ms = cpu / done * 1e3
    sqlite_ms = clock.seconds / done * 1e3
    print(f"{done} cycles in {wall:.1f} s, {args.hosts} hosts, no HTTP, background loops off")
    print(f"  CPU a cycle (this process, all threads): {per_cycle_ms:.3f} ms")
    print(f"  calls into SQLite a cycle: {clock.calls / done:.1f}, taking {sqlite_ms:.3f} ms")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    share = sqlite_ms / per_cycle_ms if per_cycle_ms else 0.0
    print(
        f"cycle_cost: {per_cycle_ms:.2f} ms CPU a cycle, SQLite {sqlite_ms:.2f} ms ({share:.0%}) "
        f"in {clock.calls / done:.1f} calls"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
