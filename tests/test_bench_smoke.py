"""The dispatch benchmark runs end to end against a real `airlock serve` (a short run, not a measurement)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import PG_ADMIN

REPO = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(r"^dispatch: (\d+) cycles/s, (\d+\.\d{3}) of baseline, p99 (\d+) ms$")
COST_LINE = re.compile(
    r"^cycle_cost: (\d+\.\d\d) ms CPU a cycle, SQLite (\d+\.\d\d) ms \((\d+)%\) in (\d+\.\d) calls$"
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dispatch_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "dispatch.py"),
            "--seconds",
            "2",
            "--hosts",
            "4",
            "--warmup",
            "0.5",
            "--settle",
            "0",
            "--jobs",
            "2000",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    m = LAST_LINE.match(lines[-1])
    assert m, f"unexpected last line {lines[-1]!r}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert int(m.group(1)) > 0, proc.stdout[-3000:]
    figures = json.loads(out.read_text())
    assert figures["cycles"] > 0
    assert figures["errors"] == 0 and figures["baseline_errors"] == 0, figures["error_samples"]
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_dispatch_benchmark_on_postgresql_counts_the_database_s_cpu(tmp_path: Path, pg_admin: Any) -> None:
    """`--db postgres`: the run on a database of its own, with the CPU of PostgreSQL's own processes for
    it (they are not in the server's process tree) in the figures. `pg_admin`: skip or fail as the other
    PostgreSQL tests do when there is no server."""
    out = tmp_path / "dispatch.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dispatch.py"), "--db", "postgres",
         "--pg-url", PG_ADMIN.rsplit("/", 1)[0], "--seconds", "2", "--hosts", "4", "--warmup", "0.5",
         "--settle", "0", "--jobs", "1000", "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    figures = json.loads(out.read_text())
    assert figures["cycles"] > 0 and figures["errors"] == 0, figures["error_samples"]
    assert figures["database_cpu_ms_per_cycle"] > 0 and figures["database_cpu_cores_dispatch"] > 0
    assert "PostgreSQL's CPU per cycle" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_boinc_rpc_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "boinc_rpc.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "boinc_rpc.py"), "--seconds", "2", "--hosts", "4",
         "--jobs", "8000", "--json", str(out)],  # 2 s at up to 4,000 RPCs/s: never runs dry
        capture_output=True, text=True, timeout=110, cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    m = re.match(r"^boinc_rpc: (\d+) RPCs/s, (\d+\.\d\d) of baseline, p99 (\d+\.\d) ms$", lines[-1])
    assert m, f"unexpected last line {lines[-1]!r}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    figures = json.loads(out.read_text())
    assert figures["rpcs_per_s"] > 0 and figures["errors"] == 0, figures["error_samples"]
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_cycle_cost_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cycle_cost.py"), "--cycles", "40", "--hosts", "4"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    m = re.match(
        r"^cycle_cost: (\d+\.\d\d) ms CPU a cycle, SQLite (\d+\.\d\d) ms \((\d+)%\) in (\d+\.\d) calls$",
        lines[-1],
    )
    assert m, f"unexpected last line {lines[-1]!r}"
    cpu, sqlite_ms, calls = float(m[1]), float(m[2]), float(m[4])
    assert 0 < sqlite_ms < cpu and calls >= 10  # a cycle is some twenty statements and three commits
