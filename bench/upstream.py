"""Upstream benchmark: DIRAC jobs matched, cached and queued per second by the gateway's generator step.

    python bench/upstream.py [--jobs 100] [--dirac-dir DIR] [--keep] [--json PATH]

Brings up a local DIRAC 9.1 with scripts/dirac/up.sh (or reuses a running one with --dirac-dir), opens a
fresh gateway data directory (SQLite) with `upstream = "dirac"` pointing at it, and, as the user alice
with DIRAC's own client API, submits the jobs (parametric JDL in bulks of --chunk, each job with an
input sandbox) and waits until the optimizers have them all Waiting. Then, in this process:

* baseline: the bare `DiracClient.match()` call (the gateway's DIRAC worker asking DIRAC's Matcher for a
  job, nothing else) on --baseline-jobs extra jobs;
* timed phase: `UpstreamSync.generate()` (the generator loop's step: match, record, download the input
  sandbox, put it in the digest cache, create the Airlock job, report Running to DIRAC) until all
  --jobs are accepted as queued Airlock jobs. The DiracUpstream instance's methods are wrapped to time
  each part of a job: the matcher call, the sandbox download, the status report, the input cache, and
  the rest (translation, database, job creation).

The gateway's overhead per job is its time per job minus the matcher call; it is also given as a ratio to
the bare matcher call. Figures go to bench/results/upstream.json; the last line printed is

    upstream: <N> jobs/s, gateway overhead <X> ms/job (<R> x the matcher's <M> ms), p99 <ms> ms

Exit status: 0 when every job was taken in, 1 if any was refused or failed, 2 when set-up failed.
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
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import select  # noqa: E402

from airlock.config import load_settings  # noqa: E402
from airlock.context import Gateway, initialise  # noqa: E402
from airlock.db import schema  # noqa: E402
from airlock.db.engine import read  # noqa: E402
from airlock.db.migrate import upgrade  # noqa: E402
from airlock.generator.inputs import input_key  # noqa: E402
from airlock.upstream.dirac import DiracUpstream  # noqa: E402
from airlock.upstream.dirac_client import DiracClient, DiracError  # noqa: E402
from airlock.upstream.sync import UpstreamSync  # noqa: E402
from procstats import cpu_seconds, process_tree  # noqa: E402

RESULTS = HERE / "results"
UP = REPO / "scripts" / "dirac" / "up.sh"
DOWN = REPO / "scripts" / "dirac" / "down.sh"
DEFAULT_UP_DIR = Path.home() / ".cache" / "airlock-dirac" / "bench"
MAX_PARAMETRIC = 20  # DIRAC's JobManager/MaxParametricJobs default: more in one JDL is refused
console = Console(highlight=False)
if not console.is_terminal:  # piped or captured: wide enough for the tables' rows
    console = Console(highlight=False, width=110)


class SetupError(RuntimeError):
    pass


# DiracUpstream methods timed in the timed phase, and the part of a job each one is
UPSTREAM_PARTS = {
    "input_sizes": "sizes",
    "download_inputs": "download",
    "report_status": "report",
    "set_parameters": "parameters",
    "heartbeat": "heartbeat",
}


# ------------------------------------------------------------------------------ DIRAC side, as alice

SUBMITTER = r'''
"""Written by bench/upstream.py and run by DIRAC's python as alice: submit the benchmark's jobs with
DIRAC's client API, then wait until the optimizers have them Waiting. One line 'AIRLOCK-BENCH {json}'."""
import json
import os
import sys
import time

args = json.loads(sys.argv[1])
sys.argv = sys.argv[:1]
from DIRAC.Core.Base.Script import Script  # noqa: E402

Script.parseCommandLine(ignoreErrors=True)
from DIRAC.Interfaces.API.Dirac import Dirac  # noqa: E402
from DIRAC.WorkloadManagementSystem.Client.JobMonitoringClient import JobMonitoringClient  # noqa: E402


def out(doc):
    print("AIRLOCK-BENCH " + json.dumps(doc), flush=True)


mon = JobMonitoringClient()
busy = mon.getJobs({"Status": ["Submitting", "Received", "Checking", "Waiting"]})
if not busy["OK"]:
    out({"error": "getJobs: " + busy["Message"]})
    sys.exit(0)
if busy["Value"]:
    out({"error": f"{len(busy['Value'])} jobs are queued in this DIRAC already", "busy": len(busy["Value"])})
    sys.exit(0)

os.chdir(args["workdir"])
with open("run.sh", "w") as fh:
    fh.write('#!/bin/sh\necho "$1" > result.txt\ncat in.txt\n')
dirac = Dirac()
ids, calls = [], 0
t0 = time.monotonic()
left, first = args["jobs"], 0
while left > 0:
    n = 1 if args["mode"] == "single" else min(args["chunk"], left)
    with open("in.txt", "w") as fh:  # a new sandbox per submission: new bytes for the gateway's cache
        fh.write(f"airlock upstream benchmark {args['tag']} input {first}\n" + "x" * args["input_bytes"])
    attrs = {
        "JobName": f'"airlock-bench-{first if n == 1 else "%s"}"',
        "JobGroup": f'"airlock-bench-{args["tag"]}"',
        "Executable": '"/bin/sh"',
        "Arguments": f'"run.sh {first if n == 1 else "%s"}"',
        "InputSandbox": '{"in.txt", "run.sh"}',
        "OutputSandbox": '{"result.txt", "std.out"}',
        "StdOutput": '"std.out"',
        "CPUTime": "3600",
    }
    if n > 1:
        attrs.update({"Parameters": str(n), "ParameterStart": str(first), "ParameterStep": "1"})
    jdl = "[\n" + "".join(f"  {k} = {v};\n" for k, v in attrs.items()) + "]\n"
    res = dirac.submitJob(jdl)
    calls += 1
    if not res["OK"]:
        out({"error": "submitJob: " + str(res["Message"]), "ids": ids})
        sys.exit(0)
    got = res["Value"] if isinstance(res["Value"], list) else [res["Value"]]
    ids.extend(int(j) for j in got)
    left -= n
    first += n
submit_s = time.monotonic() - t0

t1 = time.monotonic()
deadline = t1 + args["wait_timeout"]
states = {}
while True:
    res = mon.getJobsStatus(ids)
    if res["OK"]:
        states = {int(k): v.get("Status") for k, v in res["Value"].items()}
        if all(states.get(j) == "Waiting" for j in ids):
            break
        if any(s in ("Failed", "Killed", "Deleted") for s in states.values()):
            break
    if time.monotonic() > deadline:
        break
    time.sleep(0.25)
counts = {}
for s in states.values():
    counts[s] = counts.get(s, 0) + 1
out({"ids": ids, "calls": calls, "submit_s": submit_s, "wait_s": time.monotonic() - t1, "states": counts})
'''


@dataclass
class Dirac:
    root: Path
    info: dict[str, Any]
    brought_up: bool = False
    up_s: float = 0.0

    def tool_env(self) -> dict[str, str]:
        """The environment of a DIRAC client run as alice (as tests/dirac_fixture.py makes it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "DIRAC"))}
        env.update(self.info["env"])
        env["PATH"] = f"{Path(self.info['python']).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env["X509_USER_PROXY"] = str(self.info["alice_proxy"])
        return env

    def service_pids(self) -> list[int]:
        """The processes of the DIRAC services and optimizers (for their CPU time)."""
        pids: list[int] = []
        for pidfile in sorted((self.root / "run").glob("*.pid")):
            try:
                pids.extend(process_tree(int(pidfile.read_text().strip())))
            except (OSError, ValueError):
                continue
        return pids


def up_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["AIRLOCK_DIRAC_PORT_BASE"] = str(args.port_base)
    env["AIRLOCK_DIRAC_DB_PREFIX"] = args.db_prefix
    env.setdefault("AIRLOCK_DIRAC_LIFETIME", "3600")  # the services end by themselves even if we crash
    return env


def bring_up(args: argparse.Namespace) -> Dirac:
    if args.dirac_dir is not None:
        root = args.dirac_dir.resolve()
        if not (root / "dirac.json").exists():
            raise SetupError(f"{root}/dirac.json not found: bring DIRAC up there with scripts/dirac/up.sh")
        return Dirac(root, json.loads((root / "dirac.json").read_text()))
    root = args.up_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"bringing DIRAC up in {root} (ports from {args.port_base}, databases {args.db_prefix}*)")
    t0 = time.monotonic()
    for attempt in (1, 2):  # once more: the optimizers may lose a start-up race with OptimizationMind
        try:
            res = subprocess.run(
                ["bash", str(UP), str(root)], env=up_env(args), text=True, capture_output=True,
                timeout=args.up_timeout, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            bring_down(root, args)
            raise SetupError(f"up.sh did not finish: {exc}") from exc
        (root / "up.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
        if res.returncode == 0:
            return Dirac(root, json.loads((root / "dirac.json").read_text()), True, time.monotonic() - t0)
        bring_down(root, args)
        tail = (res.stdout[-2500:] + "\n" + res.stderr[-2500:]).strip()
        if attempt == 2:
            raise SetupError(f"up.sh failed ({res.returncode}):\n{tail}")
        console.print(f"[yellow]up.sh failed ({res.returncode}), trying once more:[/] {tail[-300:]}")
    raise AssertionError("unreachable")


def bring_down(root: Path, args: argparse.Namespace) -> None:
    res = subprocess.run(
        ["bash", str(DOWN), str(root)], env=up_env(args), text=True, capture_output=True, timeout=120
    )
    if res.returncode != 0:
        console.print(f"[yellow]down.sh {root} failed:[/] {res.stdout[-1000:]}{res.stderr[-1000:]}")


def submit(dirac: Dirac, workdir: Path, args: argparse.Namespace, count: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "submit_jobs.py"
    script.write_text(SUBMITTER.lstrip())
    doc = {
        "jobs": count,
        "mode": args.submit,
        "chunk": args.chunk,
        "workdir": str(workdir),
        "tag": workdir.parent.name.rsplit("-", 1)[-1][:12],  # JobGroup is short (VARCHAR(32))
        "input_bytes": args.input_bytes,
        "wait_timeout": args.wait_timeout,
    }
    try:
        res = subprocess.run(
            [dirac.info["python"], str(script), json.dumps(doc)], cwd=workdir, env=dirac.tool_env(),
            text=True, capture_output=True, timeout=args.wait_timeout + 600, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"submitting as alice did not finish: {exc}") from exc
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("AIRLOCK-BENCH ")]
    if res.returncode != 0 or not lines:
        raise SetupError(
            f"submitting as alice failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )
    out: dict[str, Any] = json.loads(lines[-1].removeprefix("AIRLOCK-BENCH "))
    if "error" in out:
        hint = " (bring it up afresh: scripts/dirac/up.sh re-creates its databases)" if "busy" in out else ""
        raise SetupError(f"submitting as alice: {out['error']}{hint}")
    if out["states"] != {"Waiting": count}:
        raise SetupError(f"jobs not all Waiting after {out['wait_s']:.0f} s: {out['states']}")
    return out


# ------------------------------------------------------------------------------------- measurement


@dataclass
class Timers:
    """Wall time spent in each wrapped call, and the start of every fetch_job (a job's time line)."""

    spans: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    fetches: list[tuple[float, bool]] = field(default_factory=list)  # (start, returned a job)
    current: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # this job's parts
    jobs: list[dict[str, float]] = field(default_factory=list)  # per job: its parts
    wrapped: list[tuple[Any, str]] = field(default_factory=list)

    def wrap(self, obj: Any, name: str, part: str) -> None:
        """Time obj.name (an instance attribute shadowing the method; `unwrap` deletes it)."""
        fn: Callable[..., Any] = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                self.spans[part].append(dt)
                self.current[part] += dt

        setattr(obj, name, timed)
        self.wrapped.append((obj, name))

    def unwrap(self) -> None:
        for obj, name in reversed(self.wrapped):
            delattr(obj, name)
        self.wrapped.clear()

    def wrap_fetch(self, upstream: DiracUpstream) -> None:
        fn = upstream.fetch_job

        @functools.wraps(fn)
        def fetch_job() -> Any:
            self.close_job(time.perf_counter())
            t0 = time.perf_counter()
            job = fn()
            self.fetches.append((t0, job is not None))
            if job is not None:
                self.current["_start"] = t0
                self.current["translate"] = time.perf_counter() - t0 - self.current.get("match", 0.0)
            else:
                self.spans["empty match"].append(self.current.pop("match", 0.0))
            return job

        upstream.fetch_job = fetch_job  # type: ignore[method-assign]
        self.wrapped.append((upstream, "fetch_job"))

    def close_job(self, now: float) -> None:
        """The job fetched last is over (its _take returned: the next fetch or the pass's end)."""
        start = self.current.pop("_start", None)
        if start is not None:
            job = dict(self.current)
            job["total"] = now - start
            self.jobs.append(job)
        self.current.clear()


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    if not ms:
        return {"n": 0, "mean_ms": math.nan, "p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan}
    return {
        "n": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": pct(ms, 0.50),
        "p90_ms": pct(ms, 0.90),
        "p99_ms": pct(ms, 0.99),
        "max_ms": max(ms),
    }


def open_gateway(data_dir: Path, dirac: Dirac, n: int) -> Gateway:
    settings = load_settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'airlock.db'}",
        operator_token="bench-operator-token",
        public_url="http://127.0.0.1:1",
        background=False,
        upstream="dirac",
        dirac_dir=dirac.root,
        dirac_site=str(dirac.info["site"]),
        dirac_max_queued=n + 100,  # never throttled: the benchmark measures the step, not the policy
        dirac_match_per_pass=n + 100,
    )
    initialise(settings)
    gw = Gateway.open(settings, serving=False)
    upgrade(gw.engine)
    return gw


def dirac_worker_pid() -> int | None:
    """The DiracClient's worker process (a child of this one running dirac_worker.py)."""
    for pid in process_tree(os.getpid()):
        try:
            if b"dirac_worker.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def verify(gw: Gateway, refs: set[str]) -> dict[str, Any]:
    """What became of our DIRAC jobs in the gateway: rows by state, and the accepted ones that are really
    queued Airlock jobs with every input in the digest cache."""
    u, j = schema.upstream_jobs, schema.jobs
    with read(gw.engine) as conn:
        rows = list(
            conn.execute(
                select(u.c.ref, u.c.state, u.c.error, j.c.state.label("job_state"), j.c.spec).outerjoin(
                    j, j.c.id == u.c.job_id
                )
            )
        )
    states: dict[str, int] = defaultdict(int)
    queued = cached = 0
    errors: list[str] = []
    for r in rows:
        if r.ref not in refs:
            states["(not ours) " + r.state] += 1
            continue
        states[r.state] += 1
        if r.error and len(errors) < 5:
            errors.append(f"DIRAC job {r.ref}: {r.error}")
        if r.state != "accepted":
            continue
        queued += r.job_state == "queued"
        inputs = (r.spec or {}).get("inputs", [])
        cached += bool(inputs) and all(gw.inputs.exists(input_key(i["sha256"])) for i in inputs)
    return {"rows": dict(states), "queued": queued, "inputs_cached": cached, "errors": errors}


def run(args: argparse.Namespace) -> dict[str, Any]:
    dirac = bring_up(args)
    work = Path(tempfile.mkdtemp(prefix="airlock-bench-upstream-"))
    client: DiracClient | None = None
    gw: Gateway | None = None
    try:
        total = args.jobs + args.baseline_jobs + 1
        console.print(
            f"DIRAC in {dirac.root}"
            + (f" (up in {dirac.up_s:.0f} s)" if dirac.brought_up else " (reused)")
            + f"; submitting {total} jobs as alice ({args.submit}) and waiting until they are Waiting"
        )
        sub = submit(dirac, work / "alice", args, total)
        ours = {str(i) for i in sub["ids"]}
        console.print(
            f"submitted {total} jobs in {sub['submit_s']:.1f} s ({total / sub['submit_s']:.1f} jobs/s, "
            f"{sub['calls']} submitJob calls); all Waiting {sub['wait_s']:.1f} s later"
        )

        gw = open_gateway(work / "gateway", dirac, args.jobs)
        log_dir = gw.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        client = DiracClient.from_dir(dirac.root, stderr=str(log_dir / "dirac-worker.log"))
        upstream = DiracUpstream(gw.settings, client=client)
        resource = upstream.resource()

        # ---- baseline: the bare matcher call, on the same worker the gateway then uses
        t0 = time.perf_counter()
        first = client.match(resource)  # starts the worker and initialises DIRAC: not counted
        cold_s = time.perf_counter() - t0
        if first is None:
            raise SetupError(f"the Matcher gives no job to the gateway's site {resource}")
        baseline_refs, base = [first.job_id], []
        for _ in range(args.baseline_jobs):
            t0 = time.perf_counter()
            m = client.match(resource)
            base.append(time.perf_counter() - t0)
            if m is None:
                raise SetupError("the Matcher ran out of jobs during the baseline")
            baseline_refs.append(m.job_id)
        refs = ours - {str(i) for i in baseline_refs}
        base_ms = summary_ms(base)
        console.print(
            f"baseline: {len(base)} bare DiracClient.match() calls, mean {base_ms['mean_ms']:.1f} ms "
            f"(first call, starting the worker and DIRAC: {cold_s:.1f} s)"
        )

        # ---- the timed phase: the generator step until all N are taken in
        sync = UpstreamSync(gw, upstream)
        timers = Timers()
        timers.wrap(client, "match", "match")
        for name, part in UPSTREAM_PARTS.items():
            if hasattr(upstream, name):  # input_sizes: an optional ability (airlock.upstream.base)
                timers.wrap(upstream, name, part)
        timers.wrap(gw.inputs, "exists", "cache")
        timers.wrap(gw.inputs, "copy_in", "cache")
        timers.wrap_fetch(upstream)
        worker_pid = dirac_worker_pid()
        service_pids = dirac.service_pids()
        cpu0 = (time.process_time(), cpu_seconds(worker_pid) if worker_pid else 0.0, cpu_of(service_pids))
        console.print(f"timed phase: UpstreamSync.generate() until the {len(refs)} jobs are taken in")
        passes = taken = 0
        t_start = time.perf_counter()
        deadline = t_start + args.timeout
        timed_out = False
        settled, progress_at = 0, t_start
        while True:
            taken += sync.generate()
            now = time.perf_counter()
            timers.close_job(now)
            passes += 1
            check = verify(gw, refs)
            done = sum(n for s, n in check["rows"].items() if s != "matched" and not s.startswith("("))
            if done >= len(refs):
                break
            if done > settled:
                settled, progress_at = done, now
            if now > deadline or now - progress_at > args.stall:
                timed_out = True
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t_start
        cpu1 = (time.process_time(), cpu_seconds(worker_pid) if worker_pid else 0.0, cpu_of(service_pids))
        timers.unwrap()
        check = verify(gw, refs)

        # the baseline's jobs were matched and are left Matched in DIRAC: fail them there
        for job_id in baseline_refs:
            try:
                client.set_status(job_id, "Failed", "Airlock benchmark: matched by the baseline only")
            except DiracError as exc:
                console.print(f"[yellow]baseline job {job_id}: {exc}[/]")

        # ---- figures
        jobs = timers.jobs
        parts = ("match", "translate", *UPSTREAM_PARTS.values(), "cache")
        per_job: dict[str, list[float]] = {p: [j.get(p, 0.0) for j in jobs] for p in parts}
        per_job["total"] = [j["total"] for j in jobs]
        per_job["rest"] = [j["total"] - sum(j.get(p, 0.0) for p in parts) for j in jobs]
        per_job["overhead"] = [j["total"] - j.get("match", 0.0) for j in jobs]
        accepted = int(check["rows"].get("accepted", 0))
        n_jobs = len(jobs)
        overhead_ms = summary_ms(per_job["overhead"])["mean_ms"]
        result: dict[str, Any] = {
            "jobs": args.jobs,
            "accepted": accepted,
            "queued": check["queued"],
            "inputs_cached": check["inputs_cached"],
            "rows": check["rows"],
            "refused_or_failed": sum(n for s, n in check["rows"].items() if s != "accepted" and s[0] != "("),
            "row_errors": check["errors"],
            "timed_out": timed_out,
            "seconds": wall,
            "passes": passes,
            "jobs_per_s": accepted / wall if wall else math.nan,
            "per_job_ms": {k: summary_ms(v) for k, v in per_job.items()},
            "jobs_timed": n_jobs,
            "gateway_overhead_ms": overhead_ms,
            "baseline_match_ms": base_ms,
            "ratio": overhead_ms / base_ms["mean_ms"] if base_ms["n"] else math.nan,
            "empty_matches": summary_ms(timers.spans.get("empty match", [])),
            "first_match_s": cold_s,
            "gateway_cpu_ms_per_job": (cpu1[0] - cpu0[0]) / max(1, accepted) * 1e3,
            "dirac_worker_cpu_ms_per_job": (cpu1[1] - cpu0[1]) / max(1, accepted) * 1e3,
            "dirac_services_cpu_ms_per_job": (cpu1[2] - cpu0[2]) / max(1, accepted) * 1e3,
            "submit": {
                "mode": args.submit,
                "jobs": total,
                "calls": sub["calls"],
                "seconds": sub["submit_s"],
                "jobs_per_s": total / sub["submit_s"] if sub["submit_s"] else math.nan,
                "until_waiting_s": sub["wait_s"],
            },
            "dirac": {"root": str(dirac.root), "brought_up": dirac.brought_up, "up_s": dirac.up_s},
            "input_bytes": args.input_bytes,
            "cpu_count": os.cpu_count(),
        }
        return result
    finally:
        if client is not None:
            client.close()
        if gw is not None:
            gw.close()
        if args.keep:
            console.print(f"gateway data and submission folders kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if dirac.brought_up:
            if args.keep:
                console.print(f"DIRAC left running: stop it with scripts/dirac/down.sh {dirac.root}")
            else:
                bring_down(dirac.root, args)


# ------------------------------------------------------------------------------------------- printing


def fmt(x: Any, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


PART_NAMES = {
    "total": "whole job (match to accepted)",
    "match": "  DIRAC matcher call (match)",
    "translate": "  JDL translation",
    "sizes": "  input sizes asked of DIRAC",
    "download": "  input sandbox download",
    "cache": "  digest cache (exists + copy_in)",
    "report": "  status report (Running)",
    "parameters": "  job parameters (AirlockJob)",
    "heartbeat": "  heartbeats",
    "rest": "  database: record, job creation, accept",
    "overhead": "gateway overhead (whole job - matcher call)",
}


def show(r: dict[str, Any]) -> None:
    table = Table(title=f"Airlock upstream benchmark: {r['jobs']} DIRAC jobs through UpstreamSync.generate()")
    table.add_column("figure")
    table.add_column("value", justify="right")
    sub = r["submit"]
    rows = [
        ("jobs taken in (accepted / queued / inputs cached)",
         f"{r['accepted']} / {r['queued']} / {r['inputs_cached']}"),
        ("refused, failed or not taken in", str(r["refused_or_failed"])),
        ("jobs/s matched, cached and queued", fmt(r["jobs_per_s"], 2)),
        ("timed phase", f"{r['seconds']:.2f} s in {r['passes']} generate() pass(es)"),
        ("gateway overhead per job (mean)", f"{fmt(r['gateway_overhead_ms'])} ms"),
        ("bare DiracClient.match() (baseline, mean / p50 / p99)",
         f"{fmt(r['baseline_match_ms']['mean_ms'])} / {fmt(r['baseline_match_ms']['p50_ms'])} / "
         f"{fmt(r['baseline_match_ms']['p99_ms'])} ms ({r['baseline_match_ms']['n']} calls)"),
        ("ratio: overhead / bare matcher call", fmt(r["ratio"], 2)),
        ("empty matcher calls (end of a pass)",
         f"{r['empty_matches']['n']} x {fmt(r['empty_matches']['mean_ms'])} ms"),
        ("CPU per job: gateway / DIRAC worker / DIRAC services",
         f"{fmt(r['gateway_cpu_ms_per_job'])} / {fmt(r['dirac_worker_cpu_ms_per_job'])} / "
         f"{fmt(r['dirac_services_cpu_ms_per_job'])} ms"),
        ("submitted as alice (jobs/s)",
         f"{sub['jobs']} in {sub['seconds']:.1f} s ({fmt(sub['jobs_per_s'])}/s, {sub['calls']} submitJob, "
         f"{sub['mode']})"),
        ("then until all Waiting (optimizers)", f"{sub['until_waiting_s']:.1f} s"),
        ("first match (worker start + DIRAC init)", f"{r['first_match_s']:.1f} s"),
    ]  # fmt: skip
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)

    parts = Table(title="time per job in the timed phase (ms)")
    for col in ("part", "mean", "p50", "p90", "p99", "max"):
        parts.add_column(col, justify="left" if col == "part" else "right")
    for key, label in PART_NAMES.items():
        s = r["per_job_ms"].get(key)
        if not s or not s["n"] or not s.get("max_ms"):
            continue  # a call the generator did not make (no heartbeat is due when a job is taken in)
        parts.add_row(label, fmt(s["mean_ms"]), fmt(s["p50_ms"]), fmt(s["p90_ms"]), fmt(s["p99_ms"]),
                      fmt(s.get("max_ms")))  # fmt: skip
    console.print(parts)
    if r["timed_out"]:
        console.print("[red]the timed phase hit --timeout or --stall before every job was taken in[/]")
    for e in r["row_errors"]:
        console.print(f"[yellow]{e}[/]", markup=False)


def last_line(r: dict[str, Any]) -> str:
    def num(x: Any) -> float:
        return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return (
        f"upstream: {num(r['jobs_per_s']):.1f} jobs/s, gateway overhead {num(r['gateway_overhead_ms']):.1f} "
        f"ms/job ({num(r['ratio']):.2f} x the matcher's {num(r['baseline_match_ms']['mean_ms']):.1f} ms), "
        f"p99 {num(r['per_job_ms']['total']['p99_ms']):.0f} ms"
    )


def clean(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: clean(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [clean(v) for v in doc]
    if isinstance(doc, float) and math.isnan(doc):
        return None
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--jobs", type=int, default=100, help="DIRAC jobs the gateway takes in (timed), default 100"
    )
    p.add_argument(
        "--baseline-jobs", type=int, default=20,
        help="extra jobs matched with the bare DiracClient.match() for the baseline (default 20)",
    )  # fmt: skip
    p.add_argument(
        "--dirac-dir", type=Path, default=None,
        help="reuse the DIRAC running there (brought up by scripts/dirac/up.sh DIR, with no job queued); "
        "it is neither brought up nor stopped",
    )  # fmt: skip
    p.add_argument(
        "--up-dir", type=Path,
        default=Path(os.environ.get("AIRLOCK_BENCH_DIRAC_DIR", str(DEFAULT_UP_DIR))),
        help="without --dirac-dir: bring DIRAC up here and stop it at the end "
        "(default $AIRLOCK_BENCH_DIRAC_DIR or ~/.cache/airlock-dirac/bench; its venv is reused)",
    )  # fmt: skip
    p.add_argument("--port-base", type=int, default=29540, help="with --up-dir: DIRAC's first port (29540)")
    p.add_argument(
        "--db-prefix", default="airlock_bench_dirac_",
        help="with --up-dir: DIRAC's MariaDB database prefix (airlock_bench_dirac_)",
    )  # fmt: skip
    p.add_argument("--up-timeout", type=float, default=1200, help="most seconds up.sh may take")
    p.add_argument(
        "--submit", choices=["parametric", "single"], default="parametric",
        help="parametric: one submitJob per --chunk jobs (one sandbox each); single: one submitJob and "
        "one sandbox per job",
    )  # fmt: skip
    p.add_argument(
        "--chunk", type=int, default=MAX_PARAMETRIC,
        help=f"jobs per parametric JDL (DIRAC refuses more than its MaxParametricJobs, {MAX_PARAMETRIC})",
    )  # fmt: skip
    p.add_argument("--input-bytes", type=int, default=1000, help="size of each sandbox's in.txt (about)")
    p.add_argument("--wait-timeout", type=float, default=300, help="most seconds until all jobs are Waiting")
    p.add_argument("--timeout", type=float, default=600, help="most seconds of the timed phase")
    p.add_argument(
        "--stall", type=float, default=60,
        help="end the timed phase when no job was taken in (or refused) for this many seconds",
    )  # fmt: skip
    p.add_argument(
        "--keep", action="store_true",
        help="keep the gateway data and submission folders, and leave a DIRAC this run brought up running",
    )  # fmt: skip
    p.add_argument(
        "--json", type=Path, default=None, help="where to write the figures (bench/results/upstream.json)"
    )
    args = p.parse_args(argv)
    if args.jobs < 1 or args.baseline_jobs < 1 or args.chunk < 1:
        p.error("--jobs, --baseline-jobs and --chunk must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (SetupError, DiracError) as exc:
        console.print(f"[red]set-up failed:[/] {exc}")
        return 2
    show(result)
    out = args.json or RESULTS / "upstream.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean(result), indent=2) + "\n")
    console.print(f"figures written to {out}")
    sys.stdout.flush()
    print(last_line(result), flush=True)
    return 0 if result["refused_or_failed"] == 0 and result["accepted"] >= args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
