"""How much load can the generator produce? Runs the benchmark's own client code (workload.py) against a
stand-in server (fakeserver.py) and reports the generator's CPU cost per request and per cycle.

    python bench/loadgen_selftest.py [--seconds 5] [--hosts 64] [--kind raw|fastapi|asgi|asgi-granian]

With `--kind raw` the stand-in costs almost nothing per request, so the rates printed are close to the
generator's own ceiling when it shares the machine with a server.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import PhaseResult, free_port, stop_process, timed_phase, wait_healthy
from loadgen import Connection, install_fast_loop
from procstats import TreeMonitor
from workload import Host, cycle_summary, run_cycles, run_healthz

HERE = Path(__file__).resolve().parent


def describe(name: str, result: PhaseResult, requests_per_unit: int) -> dict[str, float]:
    stats = result.stats
    units = len(stats.endpoint("healthz").latencies) if name == "healthz" else len(stats.cycles)
    rate = units / stats.seconds
    requests = units * requests_per_unit
    gen_us = result.loadgen_cpu_s / requests * 1e6 if requests else float("nan")
    srv_us = result.server_cpu_s / requests * 1e6 if requests else float("nan")
    print(
        f"{name:8s} {rate:9.0f} /s  ({rate * requests_per_unit:7.0f} req/s)  errors {stats.errors}"
        f"  generator {result.loadgen_cpu_s / stats.seconds * 100:5.1f}% of a core"
        f" = {gen_us:5.1f} us CPU/request"
        f" (ceiling ~{1e6 / gen_us if requests else 0:,.0f} req/s/core)"
        f"  server {srv_us:5.1f} us/request"
    )
    for sample in stats.error_samples[:3]:
        print("   ", sample)
    return {"rate": rate, "generator_us_per_request": gen_us, "server_us_per_request": srv_us}


async def main_async(args: argparse.Namespace) -> None:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="fakeserver-", suffix=".log")[1])
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fakeserver.py"), "--kind", args.kind, "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await wait_healthy("127.0.0.1", port, proc, log)
        monitor = TreeMonitor(proc.pid, interval=0.5)
        monitor.start()
        base = f"http://127.0.0.1:{port}"
        hosts = [Host(i, 1, i + 1, "t" * 500, Connection("127.0.0.1", port), base) for i in range(args.hosts)]
        for h in hosts:
            await h.conn.connect()
        print(f"stand-in server: {args.kind}; {args.hosts} connections; {args.seconds:.0f} s per phase")
        base_res = await timed_phase(args.seconds, lambda s: [run_healthz(h.conn, s) for h in hosts], monitor)
        describe("healthz", base_res, 1)
        cyc_res = await timed_phase(args.seconds, lambda s: [run_cycles(h, s) for h in hosts], monitor)
        describe("cycles", cyc_res, 3)
        summary = cycle_summary(cyc_res.stats)
        print(f"cycle latency p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms")
        monitor.stop()
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hosts", type=int, default=64)
    parser.add_argument("--kind", choices=["raw", "fastapi", "asgi", "asgi-granian"], default="raw")
    args = parser.parse_args()
    print("event loop:", install_fast_loop())
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
