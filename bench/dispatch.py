"""Dispatch benchmark: how many full volunteer cycles per second a real `airlock serve` sustains.

    python bench/dispatch.py [--seconds 20] [--hosts 64] [--db sqlite|postgres] [--workers N]

Starts a real server on a fresh data directory (and, for PostgreSQL, a fresh database), fills it with jobs,
registers H volunteers and hosts, then measures over real HTTP with keep-alive connections:

* baseline: H clients hammering GET /healthz (the trivial endpoint) for the given duration;
* dispatch: H simulated hosts doing full cycles: POST /api/v1/work, PUT the output to the data bridge,
  POST /api/v1/tasks/{id}/report.

The ratio is (cycles/s) / (baseline requests/s). See bench/README.md. The last line printed is
`dispatch: <N> cycles/s, <R> of baseline, p99 <ms> ms`; figures go to bench/results/dispatch-<db>.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from reexec import ensure_venv

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


ensure_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from harness import (  # noqa: E402
    PhaseResult,
    free_port,
    fresh_data_dir,
    stop_process,
    timed_phase,
    wait_healthy,
)
from loadgen import Connection, Response, install_fast_loop  # noqa: E402
from procstats import TreeMonitor, backends_of  # noqa: E402
from workload import ENDPOINTS, Host, cycle_summary, run_cycles, run_healthz  # noqa: E402

RESULTS = HERE / "results"
LOCAL = "127.0.0.1"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
INPUT_BYTES = b"airlock dispatch benchmark input\n"
console = Console(highlight=False)


class SetupError(RuntimeError):
    pass


@dataclass
class SetupRetries:
    """Set-up requests answered 5xx (or broken) and retried: a server bug worth knowing about."""

    count: int = 0
    samples: list[str] = field(default_factory=list)


RETRIES = SetupRetries()


async def call(what: str, attempt: Callable[[], Awaitable[Response]], *statuses: int, tries: int = 6) -> Any:
    """A set-up request: retried with back-off on 5xx and broken connections, then checked."""
    for n in range(tries):
        try:
            r = await attempt()
        except (OSError, TimeoutError) as exc:
            if n == tries - 1:
                raise SetupError(f"{what}: {type(exc).__name__}: {exc}") from exc
            sample = f"{what}: {type(exc).__name__}: {exc}"
        else:
            if r.status < 500 or n == tries - 1:
                return expect(r, what, *statuses)
            sample = f"{what}: HTTP {r.status} {r.text(300)}"
        RETRIES.count += 1
        if len(RETRIES.samples) < 5:
            RETRIES.samples.append(sample)
        await asyncio.sleep(0.25 * 2**n)
    raise AssertionError("unreachable")


def expect(r: Response, what: str, *statuses: int) -> Any:
    if r.status not in statuses:
        raise SetupError(
            f"{what}: expected HTTP {'/'.join(map(str, statuses))}, got {r.status}: {r.text(800)}"
        )
    return r.json()


async def jobs_by_state(op: Connection, token: str) -> Counter[str]:
    """Every job of the run by state (the operator API's batch summaries)."""
    headers = [("Authorization", f"Bearer {token}")]
    found = await call("GET /api/v1/batches", lambda: op.request("GET", "/api/v1/batches", b"", headers), 200)
    states: Counter[str] = Counter()
    for batch in found:
        states.update(batch["jobs_by_state"])
    return states


# ------------------------------------------------------------------------------------------- the server


@dataclass
class Server:
    args: argparse.Namespace
    data_dir: Path
    port: int
    operator_token: str
    database_url: str | None = None
    pg_admin_url: str | None = None
    pg_db: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)
    started_in_s: float = 0.0

    def __post_init__(self) -> None:
        self.log = self.data_dir / "server.log"

    @property
    def public_url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    @property
    def airlock(self) -> str:
        if self.args.airlock:
            return str(self.args.airlock)
        candidate = Path(sys.executable).parent / "airlock"
        return str(candidate if candidate.exists() else REPO / ".venv" / "bin" / "airlock")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        env["AIRLOCK_CONFIG"] = str(self.data_dir / "airlock.toml")
        env["AIRLOCK_OPERATOR_TOKEN"] = self.operator_token
        env["AIRLOCK_WORKERS"] = str(self.args.workers)
        env["AIRLOCK_BACKGROUND"] = "false" if self.args.no_background else "true"
        if self.database_url:
            env["AIRLOCK_DATABASE_URL"] = self.database_url
        return env

    def write_config(self) -> None:
        # Hosts do hundreds of cycles each in a run: lift BOINC's per-core daily quota out of the way.
        (self.data_dir / "airlock.toml").write_text(
            "[airlock]\n"
            f'public_url = "{self.public_url}"\n'
            f'bind_host = "{LOCAL}"\n'
            f"bind_port = {self.port}\n"
            f"workers = {self.args.workers}\n"
            "daily_quota_per_core = 1000000000\n"
        )

    def create_database(self) -> None:
        import psycopg

        self.pg_admin_url = self.args.pg_url.rstrip("/")
        self.pg_db = f"airlock_bench_{secrets.token_hex(4)}"
        with psycopg.connect(f"{self.pg_admin_url}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.pg_db}"')
        self.database_url = f"{self.pg_admin_url}/{self.pg_db}"

    def drop_database(self) -> None:
        if not self.pg_db:
            return
        import psycopg

        with psycopg.connect(f"{self.pg_admin_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        self.pg_db = None

    async def start(self) -> None:
        if self.args.db == "postgres":
            self.create_database()
        self.write_config()
        init = subprocess.run(
            [self.airlock, "init", "--data-dir", str(self.data_dir)],
            env=self.env(),
            capture_output=True,
            timeout=120,
        )
        if init.returncode != 0:
            out = (init.stdout + init.stderr).decode(errors="replace")
            raise SetupError(f"`airlock init` failed ({init.returncode}):\n{out[-3000:]}")
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [self.airlock, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)],
                env=self.env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop_process can reap every worker
            )
        self.started_in_s = await wait_healthy(LOCAL, self.port, self.proc, self.log)

    def stop(self) -> int | None:
        code = stop_process(self.proc) if self.proc is not None else None
        try:
            self.drop_database()
        except Exception as exc:
            console.print(f"[yellow]could not drop database {self.pg_db}: {exc}[/]")
        return code


# --------------------------------------------------------------------------------------------- set-up


def job_document(name: str, input_sha256: str) -> dict[str, Any]:
    return {
        "name": name,
        "command": ["sh", "-c", "cat in.txt > out.txt"],
        "inputs": [{"name": "in.txt", "sha256": input_sha256}],
        "outputs": [{"name": "out.txt", "max_size": 1_000_000}],
        "resources": {"cores": 1, "memory_mb": 64, "disk_mb": 16, "runtime_s": 60},
        "copies": 1,
        "quorum": 1,
    }


@dataclass
class Submitter:
    conn: Connection
    token: str
    input_sha256: str
    chunk: int
    jobs: int = 0
    batches: int = 0
    seconds: float = 0.0
    largest_request_bytes: int = 0

    async def submit(self, count: int) -> None:
        while count > 0:
            n = min(self.chunk, count)
            k = self.batches
            doc = {
                "name": f"dispatch-bench-{k:04d}",
                "jobs": [job_document(f"b{k}-j{i}", self.input_sha256) for i in range(n)],
            }
            body = json.dumps(doc, separators=(",", ":")).encode()
            self.largest_request_bytes = max(self.largest_request_bytes, len(body))
            headers = [("Authorization", f"Bearer {self.token}"), ("Content-Type", "application/json")]
            t0 = time.perf_counter()
            created = await call(
                f"POST /api/v1/batches ({n} jobs)",
                lambda b=body, h=headers: self.conn.request("POST", "/api/v1/batches", b, h, timeout=900),  # type: ignore[misc]
                201,
            )
            self.seconds += time.perf_counter() - t0
            if len(created.get("jobs", [])) != n:
                raise SetupError(f"batch of {n} jobs created {len(created.get('jobs', []))}")
            self.jobs += n
            self.batches += 1
            count -= n


async def register_host(i: int, server: Server, sem: asyncio.Semaphore) -> Host:
    async with sem:
        conn = Connection(LOCAL, server.port, timeout=120)
        name = f"bench{i:04d}"
        password = secrets.token_urlsafe(18)
        account = {"name": name, "password": password}
        vol = await call(
            "POST /api/v1/volunteers",
            lambda: conn.request_json("POST", "/api/v1/volunteers", account, server.operator_token),
            201,
        )
        login = {"username": name, "password": password}
        tok = await call(
            "POST /api/v1/auth/token", lambda: conn.request_json("POST", "/api/v1/auth/token", login), 200
        )
        registration = {
            "name": f"{name}-host",
            "platform": "x86_64-pc-linux-gnu",
            "cores": 1,
            "memory_mb": 4096,
            "disk_mb": 20_000,
        }
        host = await call(
            "POST /api/v1/hosts",
            lambda: conn.request_json("POST", "/api/v1/hosts", registration, tok["access_token"]),
            201,
        )
        conn.timeout = None  # from here on the hot path: phases are bounded as a whole
        return Host(i, int(vol["id"]), int(host["host_id"]), tok["access_token"], conn, server.public_url)


# -------------------------------------------------------------------------------------------- profiling


def start_profiler(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        console.print("[yellow]--profile: py-spy not found (pip install py-spy into the venv)[/]")
        return None
    assert server.proc is not None
    out.unlink(missing_ok=True)  # a stale profile must not pass for this run's
    cmd = [py_spy, "record", "--pid", str(server.proc.pid), "--duration", str(max(1, int(seconds)))]
    cmd += ["--rate", "100", "--format", "raw", "--output", str(out), "--nonblocking", "--subprocesses"]
    cmd += server.args.py_spy_args.split()
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _role(frames: list[str]) -> str:
    """Which part of the server a sample belongs to: a background loop, the request thread pool, or the
    event loop (async endpoints, uvicorn, FastAPI's routing)."""
    for i, f in enumerate(frames):
        if f.startswith("Loop.run (airlock/service.py"):
            for g in frames[i + 1 :]:
                if "<lambda>" not in g:
                    return "background: " + g.split(" ")[0]
            return "background"
        if f.startswith("WorkerThread.run"):
            for g in frames[i + 1 :]:
                if "airlock/api/" in g:
                    return "request thread pool: " + g.split(" ")[0]
            return "request thread pool"
    return "event loop thread"


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Shares of py-spy's samples (collapsed stacks) by server part, by function (self) and by airlock
    function (inclusive)."""
    roles: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        n = int(count)
        total += n
        roles[_role(frames)] += n
        own[frames[-1]] += n
        for f in set(frames):
            if "(airlock/" in f:
                incl[f] += n
    if not total:
        return {"samples": 0, "roles": [], "self": [], "inclusive_airlock": []}

    def share(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(f, round(100 * n / total, 1)) for f, n in c.most_common(k)]

    return {
        "samples": total,
        "roles": share(roles, 20),
        "self": share(own, top),
        "inclusive_airlock": share(incl, top),
    }


# ------------------------------------------------------------------------------------------------ run


def finite(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def clean(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: clean(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [clean(v) for v in doc]
    if isinstance(doc, float):
        return finite(doc)
    return doc


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = fresh_data_dir("airlock-dispatch-")
    server = Server(args, data_dir, free_port(), secrets.token_urlsafe(32))
    monitor: TreeMonitor | None = None
    db_monitor: TreeMonitor | None = None  # PostgreSQL's own processes for this database
    hosts: list[Host] = []
    result: dict[str, Any] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        console.print(
            f"starting [bold]airlock serve[/] ({args.db}, {args.workers} worker(s), background loops "
            f"{'off' if args.no_background else 'on'}) in {data_dir}"
        )
        await server.start()
        assert server.proc is not None
        monitor = TreeMonitor(server.proc.pid, interval=0.25)
        monitor.start()
        if server.pg_db is not None:
            pg_db = server.pg_db
            db_monitor = TreeMonitor(0, interval=0.25, select=lambda: backends_of(pg_db))
            db_monitor.start()
        console.print(f"server up in {server.started_in_s:.1f} s on port {server.port}")

        # ---- set-up through the operator and volunteer APIs
        op = Connection(LOCAL, server.port, timeout=120)
        op_headers = [
            ("Authorization", f"Bearer {server.operator_token}"),
            ("Content-Type", "application/octet-stream"),
        ]
        stored = await call(
            "POST /api/v1/inputs", lambda: op.request("POST", "/api/v1/inputs", INPUT_BYTES, op_headers), 201
        )
        submitter = Submitter(op, server.operator_token, stored["sha256"], args.chunk)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(args.setup_concurrency)
        hosts = list(await asyncio.gather(*(register_host(i, server, sem) for i in range(args.hosts))))
        hosts_setup_s = time.perf_counter() - t0
        console.print(
            f"{args.hosts} volunteers registered, logged in and hosts registered in {hosts_setup_s:.1f} s"
        )

        initial = args.jobs or max(args.chunk, args.hosts * 20)
        await submitter.submit(initial)
        console.print(
            f"submitted {submitter.jobs} jobs in {submitter.seconds:.1f} s "
            f"({submitter.jobs / submitter.seconds:,.0f} jobs/s)"
        )

        # ---- warm-up: a short untimed run, which also tells how many jobs the timed run needs
        warm: PhaseResult | None = None
        consumed = 0
        if args.warmup > 0:
            warm = await timed_phase(args.warmup, lambda s: [run_cycles(h, s) for h in hosts], monitor)
            consumed = (
                len(warm.stats.cycles) + sum(ep.errors for ep in warm.stats.endpoints.values()) + args.hosts
            )
            warm_rate = len(warm.stats.cycles) / args.warmup
            console.print(f"warm-up: {warm_rate:,.0f} cycles/s, {warm.stats.errors} errors")
            for sample in warm.stats.error_samples[:4]:
                console.print(f"  [red]{sample}[/]")
        else:
            warm_rate = 0.0
        if not args.jobs:
            needed = int(max(warm_rate, 500.0) * args.seconds * args.headroom) + args.hosts * 4
            top_up = min(needed - (submitter.jobs - consumed), args.max_jobs - submitter.jobs)
            if top_up > 0:
                before = submitter.seconds
                await submitter.submit(top_up)
                console.print(
                    f"topped up {top_up} jobs in {submitter.seconds - before:.1f} s "
                    f"(total {submitter.jobs}: enough for {args.headroom:g}x the warm-up rate)"
                )
        if args.settle > 0:
            await asyncio.sleep(args.settle)  # let the background loops drain the warm-up's reports

        # ---- baseline: the trivial endpoint, same clients, same duration
        console.print(f"baseline: {args.hosts} clients on GET /healthz for {args.seconds:g} s")
        base = await timed_phase(args.seconds, lambda s: [run_healthz(h.conn, s) for h in hosts], monitor)

        # ---- the timed dispatch phase
        profiler = None
        profile_raw = RESULTS / f"profile-{args.db}.txt"
        if args.profile:
            profiler = start_profiler(server, args.seconds, profile_raw)
            await asyncio.sleep(0.5)
        console.print(f"dispatch: {args.hosts} hosts doing full cycles for {args.seconds:g} s")
        jobs_before = await jobs_by_state(op, server.operator_token)
        db_cpu0 = db_monitor.total_cpu_s() if db_monitor is not None else 0.0
        disp = await timed_phase(args.seconds, lambda s: [run_cycles(h, s) for h in hosts], monitor)
        db_cpu = db_monitor.total_cpu_s() - db_cpu0 if db_monitor is not None else None
        jobs_after = await jobs_by_state(op, server.operator_token)
        profile: dict[str, Any] | None = None
        if profiler is not None:
            _, err = profiler.communicate(timeout=60)
            if profile_raw.exists():
                profile = summarise_profile(profile_raw)
            else:
                console.print(f"[yellow]py-spy produced nothing: {err.decode(errors='replace')[-500:]}[/]")

        for h in hosts:
            h.conn.close()
        op.close()
        monitor.stop()
        peak_sampled_kb = monitor.peak_rss_kb
        sum_hwm_kb = monitor.sum_hwm_kb()
        foreign = sorted({n for h in hosts for n in h.foreign_upload_hosts})

        # ---- figures
        cyc = cycle_summary(disp.stats)
        base_ep = base.stats.endpoint("healthz").summary(base.stats.seconds)
        base_rate = float(base_ep["requests_per_s"])
        cycles_per_s = float(cyc["cycles_per_s"])
        n_cycles = int(cyc["cycles"])
        disp_requests = sum(len(disp.stats.endpoint(e).latencies) for e in ENDPOINTS)
        result = {
            "db": args.db,
            "workers": args.workers,
            "background": not args.no_background,
            "hosts": args.hosts,
            "seconds": args.seconds,
            "cycles": n_cycles,
            "cycles_per_s": cycles_per_s,
            "requests_per_s": disp_requests / disp.stats.seconds,
            "baseline_requests_per_s": base_rate,
            "ratio": cycles_per_s / base_rate if base_rate else math.nan,
            "per_request_ratio": 3 * cycles_per_s / base_rate if base_rate else math.nan,
            "cycle_latency_ms": {k: v for k, v in cyc.items() if k.endswith("_ms")},
            "endpoints": {e: disp.stats.endpoint(e).summary(disp.stats.seconds) for e in ENDPOINTS},
            "baseline": base_ep,
            "errors": disp.stats.errors,
            "baseline_errors": base.stats.errors,
            "error_samples": disp.stats.error_samples + base.stats.error_samples,
            "empty_work_replies": disp.stats.empty_work,
            "starved": disp.stats.empty_work > 0,
            "server_cpu_ms_per_cycle": disp.server_cpu_s / n_cycles * 1e3 if n_cycles else math.nan,
            "server_cpu_us_per_healthz": base.server_cpu_s / base_ep["requests"] * 1e6
            if base_ep["requests"]
            else math.nan,
            "server_cpu_cores_dispatch": disp.server_cpu_s / disp.stats.seconds,
            # PostgreSQL's backends for the bench's database, which run on the same machine (None: SQLite)
            "database_cpu_ms_per_cycle": db_cpu / n_cycles * 1e3 if db_cpu is not None and n_cycles else None,
            "database_cpu_cores_dispatch": db_cpu / disp.stats.seconds if db_cpu is not None else None,
            "server_cpu_cores_baseline": base.server_cpu_s / base.stats.seconds,
            "loadgen_cpu_cores_dispatch": disp.loadgen_cpu_s / disp.stats.seconds,
            "loadgen_cpu_cores_baseline": base.loadgen_cpu_s / base.stats.seconds,
            "loadgen_cpu_us_per_request_dispatch": disp.loadgen_cpu_s / disp_requests * 1e6
            if disp_requests
            else math.nan,
            # whether the background loops kept up: jobs that reached done during the phase, and the
            # results still waiting for the validator or the assimilator at its end
            "jobs_done_per_s": (jobs_after["done"] - jobs_before["done"]) / disp.stats.seconds,
            "jobs_waiting_at_end": {
                "validating": jobs_after["validating"],
                "assimilating": jobs_after["assimilating"],
            },
            "server_peak_rss_mb": peak_sampled_kb / 1024,
            "server_sum_vmhwm_mb": sum_hwm_kb / 1024,
            "server_processes": monitor.peak_processes,
            "setup": {
                "server_start_s": server.started_in_s,
                "hosts_setup_s": hosts_setup_s,
                "jobs_submitted": submitter.jobs,
                "batches": submitter.batches,
                "submit_s": submitter.seconds,
                "submit_jobs_per_s": submitter.jobs / submitter.seconds if submitter.seconds else math.nan,
                "largest_batch_request_mb": submitter.largest_request_bytes / 1e6,
                "warmup_cycles_per_s": warm_rate,
            },
            "setup_retries": RETRIES.count,
            "setup_retry_samples": RETRIES.samples,
            "upload_urls_on_other_hosts": foreign,
            "cpu_count": os.cpu_count(),
            "event_loop": args.loop_name,
            "profile": profile,
            "profiled": bool(args.profile),
        }
    finally:
        for h in hosts:
            h.conn.close()
        for watching in (monitor, db_monitor):
            if watching is not None:
                watching.stop()
        code = server.stop()
        result["server_exit_code"] = code
        if server.log.exists():
            shutil.copyfile(server.log, RESULTS / f"dispatch-{args.db}-server.log")
        if args.keep:
            console.print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------- printing


def ms(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def keeping_up(result: dict[str, Any]) -> str:
    """Jobs done a second, and as a share of the cycles (100 %: the loops assimilate as fast as hosts
    report; less: a backlog grows, and the run's CPU per cycle leaves part of a cycle's cost unpaid)."""
    rate = f"{result['jobs_done_per_s']:,.0f}"
    if not result["background"] or not result["cycles_per_s"]:
        return rate
    return f"{rate} ({result['jobs_done_per_s'] / result['cycles_per_s']:.0%} of cycles/s)"


def show(result: dict[str, Any]) -> None:
    table = Table(title=f"Airlock dispatch benchmark ({result['db']}, {result['workers']} worker(s))")
    table.add_column("figure")
    table.add_column("value", justify="right")
    lat = result["cycle_latency_ms"]
    rows = [
        ("cycles/s (work + upload + report)", f"{result['cycles_per_s']:,.0f}"),
        ("requests/s during cycles", f"{result['requests_per_s']:,.0f}"),
        ("baseline GET /healthz requests/s", f"{result['baseline_requests_per_s']:,.0f}"),
        ("ratio = cycles/s / baseline req/s", f"{result['ratio']:.3f}"),
        ("per-request ratio = 3 x cycles/s / baseline", f"{result['per_request_ratio']:.3f}"),
        (
            "cycle latency p50 / p90 / p99 ms",
            f"{ms(lat['p50_ms'])} / {ms(lat['p90_ms'])} / {ms(lat['p99_ms'])}",
        ),
        ("errors (dispatch / baseline)", f"{result['errors']} / {result['baseline_errors']}"),
        ("empty work replies (ran out of jobs)", str(result["empty_work_replies"])),
        ("server CPU per cycle", f"{result['server_cpu_ms_per_cycle']:.2f} ms"),
        *(
            [
                (
                    "PostgreSQL's CPU per cycle (cores)",
                    "{database_cpu_ms_per_cycle:.2f} ms ({database_cpu_cores_dispatch:.2f})".format(**result),
                )
            ]
            if result.get("database_cpu_ms_per_cycle") is not None
            else []
        ),
        ("jobs done/s during cycles (loops keeping up?)", keeping_up(result)),
        (
            "jobs validating / assimilating at the end",
            "{validating:,} / {assimilating:,}".format(**result["jobs_waiting_at_end"]),
        ),
        ("server CPU per /healthz", f"{result['server_cpu_us_per_healthz']:.0f} us"),
        (
            "server CPU (cores) dispatch / baseline",
            f"{result['server_cpu_cores_dispatch']:.2f} / {result['server_cpu_cores_baseline']:.2f}",
        ),
        (
            "load generator CPU (cores) dispatch / baseline",
            f"{result['loadgen_cpu_cores_dispatch']:.2f} / {result['loadgen_cpu_cores_baseline']:.2f}",
        ),
        ("server peak RSS (sampled sum over processes)", f"{result['server_peak_rss_mb']:.0f} MB"),
        ("server sum of per-process VmHWM", f"{result['server_sum_vmhwm_mb']:.0f} MB"),
        (
            "jobs submitted (jobs/s)",
            f"{result['setup']['jobs_submitted']:,} ({result['setup']['submit_jobs_per_s']:,.0f}/s)",
        ),
        (
            "hosts / seconds / machine cores",
            f"{result['hosts']} / {result['seconds']:g} / {result['cpu_count']}",
        ),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)

    ep_table = Table(title="per-request latency by endpoint (ms)")
    for col in ("endpoint", "requests", "req/s", "p50", "p90", "p99", "max", "errors"):
        ep_table.add_column(col, justify="left" if col == "endpoint" else "right")
    for name, s in [*result["endpoints"].items(), ("healthz (baseline)", result["baseline"])]:
        ep_table.add_row(
            name,
            f"{s['requests']:,}",
            f"{s['requests_per_s']:,.0f}",
            ms(s["p50_ms"]),
            ms(s["p90_ms"]),
            ms(s["p99_ms"]),
            ms(s["max_ms"]),
            str(s["errors"]),
        )
    console.print(ep_table)
    if result["error_samples"]:
        console.print("[red]first errors:[/]")
        for sample in result["error_samples"][:6]:
            console.print(f"  {sample}", markup=False)
    if result["starved"]:
        console.print(
            "[yellow]the server ran out of jobs during the timed phase: the rate is a lower bound[/]"
        )
    if result["setup_retries"]:
        console.print(f"[yellow]{result['setup_retries']} set-up request(s) failed and were retried:[/]")
        for sample in result["setup_retry_samples"]:
            console.print(f"  {sample}", markup=False)
    if result["upload_urls_on_other_hosts"]:
        console.print(f"[yellow]upload URLs named other hosts {result['upload_urls_on_other_hosts']}[/]")
    if result["profiled"]:
        console.print("[yellow]profiled run: py-spy shared the CPUs, figures are lower than unprofiled[/]")
    prof = result.get("profile")
    if prof and prof.get("samples"):
        console.print(f"[bold]server profile[/] (py-spy, {prof['samples']} samples at 100 Hz, % of samples)")
        for title, key in (
            ("by part of the server", "roles"),
            ("airlock functions, inclusive", "inclusive_airlock"),
            ("functions, self", "self"),
        ):
            console.print(f"  {title}:")
            for name, pct in prof[key][:20]:
                console.print(f"    {pct:5.1f}%  {name}", markup=False, soft_wrap=True)


def last_line(result: dict[str, Any]) -> str:
    p99 = result["cycle_latency_ms"]["p99_ms"]
    p99_ms = 0 if p99 is None or math.isnan(p99) else round(p99)
    ratio = result["ratio"] if not math.isnan(result["ratio"]) else 0.0
    return f"dispatch: {round(result['cycles_per_s'])} cycles/s, {ratio:.3f} of baseline, p99 {p99_ms} ms"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seconds", type=float, default=20.0, help="duration of the baseline and of the dispatch phase"
    )
    p.add_argument("--hosts", type=int, default=64, help="simulated hosts = concurrent clients")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--workers", type=int, default=1, help="server processes (AIRLOCK_WORKERS)")
    p.add_argument(
        "--no-background", action="store_true", help="AIRLOCK_BACKGROUND=false (no validator loops)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="untimed cycles first, seconds (0: none)")
    p.add_argument("--settle", type=float, default=2.0, help="pause after set-up and warm-up, seconds")
    p.add_argument(
        "--jobs", type=int, default=0, help="submit exactly this many jobs (default: sized by warm-up)"
    )
    p.add_argument("--headroom", type=float, default=2.0, help="jobs for this many times the warm-up rate")
    p.add_argument("--max-jobs", type=int, default=500_000)
    p.add_argument("--setup-concurrency", type=int, default=8, help="volunteers registered at once")
    p.add_argument("--chunk", type=int, default=5000, help="jobs per submitted batch")
    p.add_argument(
        "--pg-url", default=os.environ.get("AIRLOCK_BENCH_PG", DEFAULT_PG), help="PostgreSQL server"
    )
    p.add_argument("--profile", action="store_true", help="py-spy the server during the dispatch phase")
    p.add_argument("--py-spy-args", default="", help="extra py-spy options, e.g. '--gil' (on-CPU only)")
    p.add_argument("--airlock", type=Path, default=None, help="the airlock executable (default: the venv's)")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.loop_name = install_fast_loop()
    try:
        result = asyncio.run(run(args))
    except SetupError as exc:
        console.print(f"[red]set-up failed:[/] {exc}", markup=True)
        return 2
    except RuntimeError as exc:
        console.print(f"[red]failed:[/] {exc}")
        return 2
    show(result)
    out = args.json or RESULTS / f"dispatch-{args.db}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean(result), indent=2) + "\n")
    console.print(f"figures written to {out}")
    sys.stdout.flush()
    print(last_line(result), flush=True)
    return 0 if result["cycles"] > 0 and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
