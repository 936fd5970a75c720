"""Starting and stopping server processes, and running timed phases while accounting CPU on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import Connection
from procstats import TreeMonitor
from workload import PhaseStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fresh_data_dir(prefix: str) -> Path:
    """A new temporary data directory for one run, inside `<tmp>/airlock-bench`, a folder with ext4's
    top-directory flag (`chattr +T`) where the filesystem has it.

    On ext4 without a journal (the benchmark machines), allocating an inode steps over every inode of its
    block group freed in the last minutes (the kernel's `recently_deleted`): right after a run removed its
    data directory, tens of thousands of them, so the next run paid for its predecessor's clean-up (seen
    at a seventh of the gateway's CPU). Below a top directory each new folder goes to a block group of
    its own choosing, away from the last run's. Elsewhere the flag is refused, which changes nothing."""
    parent = Path(tempfile.gettempdir()) / "airlock-bench"
    if not parent.exists():
        parent.mkdir(exist_ok=True)
        subprocess.run(["chattr", "+T", str(parent)], capture_output=True, check=False)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def wait_healthy(
    host: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0
) -> float:
    """Poll GET /healthz until it answers 200; returns the seconds it took. Fails fast if `proc` exits."""
    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with status {proc.returncode} before it answered:\n{tail(log)}"
            )
        conn = Connection(host, port, timeout=5)
        try:
            r = await conn.request("GET", "/healthz")
            if r.status == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status} {r.text(200)}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"server did not answer /healthz within {timeout:.0f} s ({last}):\n{tail(log)}")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL of the process group we created for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session=True: its own group
            proc.wait(5)
    # reap stragglers of the group (workers orphaned by a crash), only ever our own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


@dataclass
class PhaseResult:
    stats: PhaseStats
    loadgen_cpu_s: float
    server_cpu_s: float


async def timed_phase(
    seconds: float,
    clients: Callable[[PhaseStats], list[Coroutine[Any, Any, None]]],
    monitor: TreeMonitor | None,
    grace: float = 30.0,
) -> PhaseResult:
    """Run the client coroutines for `seconds` and account the CPU each side used meanwhile.
    Clients still waiting for an answer `grace` seconds after the end are cancelled and counted."""
    server0 = monitor.total_cpu_s() if monitor else 0.0
    cpu0 = time.process_time()
    start = time.perf_counter()
    stats = PhaseStats(start, start + seconds)
    tasks = [asyncio.ensure_future(c) for c in clients(stats)]
    _done, pending = await asyncio.wait(tasks, timeout=seconds + grace)
    for task in pending:  # a request the server never answered
        task.cancel()
        stats.hung_clients += 1
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    cpu1 = time.process_time()
    server1 = monitor.total_cpu_s() if monitor else 0.0
    # the clients finish the request under way at the end: scale to the window
    elapsed = time.perf_counter() - start
    scale = seconds / elapsed if elapsed > 0 else 1.0
    return PhaseResult(stats, (cpu1 - cpu0) * scale, (server1 - server0) * scale)
