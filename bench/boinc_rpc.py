"""BOINC scheduler-RPC benchmark: how many scheduler RPCs per second a real `airlock serve` answers.

    python bench/boinc_rpc.py [--seconds 15] [--hosts 32] [--db sqlite|postgres] [--workers N] [--background]

Starts a real server on a fresh data directory with the wrapper app signed by a throw-away key, fills it
with jobs, registers H volunteers (each gets its account key from lookup_account.php, as
`boinccmd --lookup_account` does) and attaches H simulated BOINC clients (one first-contact RPC each).
Then, over real HTTP with keep-alive connections:

* baseline: H clients hammering GET /healthz (the trivial endpoint on the same server stack);
* rpc: H clients each sending back-to-back scheduler requests as the stock client writes them
  (`airlock.boinc.request`: host info, the previous task reported as done with its stderr and output
  file, a work request), each RPC acknowledging that report and dispatching one new task.

By default the server runs one process and the scheduler is measured alone, as BOINC's published figure
(about 100 dispatches/s) is; `--background` adds the validator, assimilator and expiry loops on the same
two cores. (On SQLite a second process does not pay: both write to one database file, and the page
caches each invalidates for the other cost more than the second core gives; measured 2026-12-02: 909
RPCs/s with one process, 702 with two.) The last line printed is
`boinc_rpc: <N> RPCs/s, <R> of baseline, p99 <ms> ms`; figures go to bench/results/boinc_rpc-<db>.json.
Target (issue 4): 1,000 RPCs/s on SQLite on the 2-core machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from reexec import ensure_venv

HERE = Path(__file__).resolve().parent
ensure_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from time import perf_counter  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

from airlock.boinc.protocol import HostInfo, ReportedFile, ReportedResult, SchedulerRequest  # noqa: E402
from airlock.boinc.request import render_request  # noqa: E402
from airlock.credentials.accounts import boinc_passwd_hash  # noqa: E402
from dispatch import LOCAL, RESULTS, Server, SetupError, Submitter, call, console, expect  # noqa: E402
from harness import free_port, timed_phase  # noqa: E402
from loadgen import Connection, HTTPProtocolError, install_fast_loop, percentile  # noqa: E402
from procstats import TreeMonitor  # noqa: E402
from workload import PhaseStats, run_healthz  # noqa: E402

_RESULT = re.compile(rb"<result>\s*<name>([^<]+)</name>")
_HOSTID = re.compile(rb"<hostid>(\d+)</hostid>")
STDERR = "[airlock-wrapper] running ['sh', '-c', 'cat in.txt > out.txt']\n" * 20
OUTPUT = b"airlock benchmark output\n"


@dataclass
class Client:
    """One simulated BOINC client: its own connection, account key and host id."""

    conn: Connection
    authenticator: str
    hostid: int = 0
    seqno: int = 0
    holding: str | None = None  # the result it will report on its next RPC
    templates: dict[tuple[int, bool], bytes] = field(default_factory=dict)

    def request(self) -> bytes:
        """The next request, as the stock client writes it. Rendered once per shape with placeholders
        (the load generator shares the server's two cores, so it must cost little, as the C++ client
        does) and completed with this RPC's sequence number and reported result."""
        self.seqno += 1
        key = (self.hostid, self.holding is not None)
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = self._render(reporting=self.holding is not None)
        body = template.replace(b"@SEQNO@", str(self.seqno).encode())
        if self.holding:
            body = body.replace(b"@RESULT@", self.holding.encode())
        head = (
            f"POST /boinc/cgi HTTP/1.1\r\nHost: {self.conn.authority}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def _render(self, reporting: bool) -> bytes:
        md5 = hashlib.md5(OUTPUT).hexdigest()
        reported = (
            (
                ReportedResult(
                    name="@RESULT@", state=5, exit_status=0, final_cpu_time=61.2, final_elapsed_time=63.0,
                    stderr_out=STDERR, files=(ReportedFile("@RESULT@_0", float(len(OUTPUT)), md5),),
                ),
            )
            if reporting
            else ()
        )  # fmt: skip
        body = render_request(
            SchedulerRequest(
                authenticator=self.authenticator, hostid=self.hostid, rpc_seqno=424242,
                platform_name="x86_64-pc-linux-gnu", client_version=(7, 20, 5), work_req_seconds=3600.0,
                host=HostInfo(host_cpid=secrets.token_hex(16), domain_name=f"bench-{self.authenticator[:6]}",
                              p_ncpus=1, p_model="Bench CPU @ 2.2GHz", m_nbytes=8e9, d_free=5e10,
                              os_name="Linux Debian", os_version="12"),
                results=reported, has_code_sign_key=self.hostid > 0,
            )
        )  # fmt: skip
        return body.replace(b"<rpc_seqno>424242</rpc_seqno>", b"<rpc_seqno>@SEQNO@</rpc_seqno>")

    def take(self, body: bytes) -> bool:
        """Note the new task; True if the reply acknowledged the report and carried a task."""
        acked = (
            self.holding is None
            or re.search(rb"<result_ack>\s*<name>" + re.escape(self.holding.encode()) + rb"</name>", body)
            is not None
        )
        m = _RESULT.search(body)
        self.holding = m[1].decode() if m else None
        return acked and m is not None


async def run_rpcs(client: Client, stats: PhaseStats) -> None:
    ep = stats.endpoint("rpc")
    while True:
        t0 = perf_counter()
        if t0 >= stats.end:
            return
        try:
            r = await client.conn.send(client.request())
        except (HTTPProtocolError, ConnectionError, TimeoutError, OSError) as exc:
            stats.transport_error("rpc", exc)
            await asyncio.sleep(0.05)
            continue
        t1 = perf_counter()
        if r.status != 200 or not client.take(r.body):
            if r.status == 200:
                stats.empty_work += 1
            stats.http_error("rpc", r)
            await asyncio.sleep(0.01)
            continue
        if stats.start <= t0 and t1 <= stats.end:
            ep.latencies.append(t1 - t0)


async def attach(i: int, server: Server, sem: asyncio.Semaphore) -> Client:
    async with sem:
        conn = Connection(LOCAL, server.port, timeout=120)
        name, password = f"boinc{i:04d}", secrets.token_urlsafe(18)
        email = f"{name}@bench.example"
        account = {"name": name, "password": password, "email": email}
        await call(
            "POST /api/v1/volunteers",
            lambda: conn.request_json("POST", "/api/v1/volunteers", account, server.operator_token),
            201,
        )
        query = urlencode({"email_addr": email, "passwd_hash": boinc_passwd_hash(password, email)})
        r = await conn.request("GET", f"/boinc/lookup_account.php?{query}")
        found = re.search(rb"<authenticator>([^<]+)</authenticator>", r.body)
        if r.status != 200 or not found:
            raise SetupError(f"lookup_account.php: HTTP {r.status} {r.text(300)}")
        client = Client(conn, found[1].decode())
        client.holding = None
        first = await conn.send(client.request())  # first contact: a host id, the code-signing key, work
        hostid = _HOSTID.search(first.body)
        if first.status != 200 or hostid is None:
            raise SetupError(f"first scheduler RPC: HTTP {first.status} {first.text(600)}")
        client.hostid = int(hostid[1])
        client.take(first.body)
        conn.timeout = None
        return client


def sign_wrapper(server: Server, tmp: Path) -> None:
    keys = tmp / "offline-keys"
    for cmd in (
        [server.airlock, "boinc", "keygen", "--out", str(keys)],
        [server.airlock, "boinc", "sign-app", "--data-dir", str(server.data_dir), "--key",
         str(keys / "code_sign_private.pem"), "--version", "100", "--wrapper"],
    ):  # fmt: skip
        r = subprocess.run(cmd, env=server.env(), capture_output=True, timeout=120)
        if r.returncode != 0:
            raise SetupError(f"{' '.join(cmd[1:3])} failed: {(r.stdout + r.stderr).decode()[-2000:]}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    install_fast_loop()
    args.no_background = not args.background  # the dispatch benchmark's Server reads this
    tmp = Path(tempfile.mkdtemp(prefix="airlock-boinc-bench-"))
    server = Server(args, tmp / "data", free_port(), secrets.token_urlsafe(24))
    server.data_dir.mkdir(parents=True)
    try:
        server.write_config()
        sign_wrapper(server, tmp)
        await server.start()
        assert server.proc is not None
        op = Connection(LOCAL, server.port, timeout=600)
        stored = expect(
            await op.request("POST", "/api/v1/inputs", b"airlock boinc benchmark input\n",
                             [("Authorization", f"Bearer {server.operator_token}")]),
            "POST /api/v1/inputs", 201,
        )  # fmt: skip
        jobs = int(args.jobs)
        submitter = Submitter(op, server.operator_token, stored["sha256"], chunk=5000)
        await submitter.submit(jobs)
        sem = asyncio.Semaphore(8)
        clients = await asyncio.gather(*(attach(i, server, sem) for i in range(args.hosts)))
        monitor = TreeMonitor(server.proc.pid)
        monitor.start()
        await asyncio.sleep(1.0)
        conns = [Connection(LOCAL, server.port) for _ in range(args.hosts)]
        base = await timed_phase(args.seconds, lambda s: [run_healthz(c, s) for c in conns], monitor)
        for c in conns:
            c.close()
        rpc = await timed_phase(args.seconds, lambda s: [run_rpcs(c, s) for c in clients], monitor)
        monitor.stop()
        lat = sorted(rpc.stats.endpoint("rpc").latencies)
        baseline_rps = len(base.stats.endpoint("healthz").latencies) / args.seconds
        rps = len(lat) / args.seconds
        return {
            "db": args.db,
            "workers": args.workers,
            "background_loops": args.background,
            "hosts": args.hosts,
            "seconds": args.seconds,
            "jobs_submitted": jobs,
            "baseline_requests_per_s": baseline_rps,
            "rpcs_per_s": rps,
            "ratio_to_baseline": rps / baseline_rps if baseline_rps else float("nan"),
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "errors": rpc.stats.errors,
            "error_samples": rpc.stats.error_samples,
            "server_cpu_s_per_rpc": rpc.server_cpu_s / max(1, len(lat)),
            "loadgen_cpu_s_per_rpc": rpc.loadgen_cpu_s / max(1, len(lat)),
            "server_peak_rss_mb": monitor.sum_hwm_kb() / 1024,
        }
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each timed phase")
    p.add_argument("--hosts", type=int, default=32, help="simulated BOINC clients = concurrent connections")
    p.add_argument("--jobs", type=int, default=40_000, help="jobs submitted before the run")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--workers", type=int, default=1, help="server processes (AIRLOCK_WORKERS; default 1)")
    p.add_argument(
        "--background",
        action="store_true",
        help="also run the validator, assimilator and expiry loops in the server (by default the "
        "scheduler is measured alone, as BOINC's figure is; its daemons may run on other hosts)",
    )
    p.add_argument("--airlock", type=Path, default=None, help="the airlock executable (default: the venv's)")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        result = asyncio.run(run(args))
    except SetupError as exc:
        console.print(f"[red]set-up failed: {exc}[/]")
        return 2
    out = args.json or RESULTS / f"boinc_rpc-{args.db}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    loops = "with the validator loops" if args.background else "scheduler alone"
    console.print(
        f"{args.db}, {args.workers} server process(es), {args.hosts} clients, {loops}: "
        f"baseline {result['baseline_requests_per_s']:.0f} req/s; "
        f"scheduler RPCs {result['rpcs_per_s']:.0f}/s, p50 {result['p50_ms']:.1f} ms, "
        f"{result['errors']} errors, server CPU {result['server_cpu_s_per_rpc'] * 1e3:.2f} ms/RPC, "
        f"peak RSS {result['server_peak_rss_mb']:.0f} MB ({time.monotonic() - t0:.0f} s in all)"
    )
    for sample in result["error_samples"][:3]:
        console.print(f"  [yellow]{sample}[/]")
    print(
        f"boinc_rpc: {result['rpcs_per_s']:.0f} RPCs/s, {result['ratio_to_baseline']:.2f} of baseline, "
        f"p99 {result['p99_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
