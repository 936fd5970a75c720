"""The upstream benchmark runs end to end against a real local DIRAC 9.1 (a tiny run, not a measurement).

Its DIRAC is its own: AIRLOCK_TEST_BENCH_DIRAC_DIR (default ~/.cache/airlock-dirac/bench-server, whose
venv and certificates are reused between runs), ports from AIRLOCK_TEST_BENCH_DIRAC_PORT_BASE (29640),
databases prefixed AIRLOCK_TEST_BENCH_DIRAC_DB_PREFIX (``airlock_benchtest_dirac_``). As for the other
DIRAC tests, if it cannot be brought up the test is skipped with the reason printed, or fails when
AIRLOCK_TEST_DIRAC=required.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from .dirac_fixture import DOWN, _bring_up, _unavailable

REPO = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(
    r"^upstream: (\d+\.\d) jobs/s, gateway overhead (\d+\.\d) ms/job "
    r"\((\d+\.\d\d) x the matcher's (\d+\.\d) ms\), p99 (\d+) ms$"
)
JOBS = 5


@pytest.fixture(scope="module")
def bench_dirac() -> Iterator[Path]:
    root = Path(
        os.environ.get(
            "AIRLOCK_TEST_BENCH_DIRAC_DIR", str(Path.home() / ".cache" / "airlock-dirac" / "bench-server")
        )
    )
    root.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(root / ".session.lock", "w")  # noqa: SIM115 - held while the DIRAC is up
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        _unavailable(f"{root} is in use by another test session (set AIRLOCK_TEST_BENCH_DIRAC_DIR)")
    env = dict(os.environ)
    env["AIRLOCK_DIRAC_DB_PREFIX"] = os.environ.get(
        "AIRLOCK_TEST_BENCH_DIRAC_DB_PREFIX", "airlock_benchtest_dirac_"
    )
    env["AIRLOCK_DIRAC_PORT_BASE"] = os.environ.get("AIRLOCK_TEST_BENCH_DIRAC_PORT_BASE", "29640")
    env.setdefault("AIRLOCK_DIRAC_LIFETIME", "3600")  # the services end by themselves even if we crash
    try:
        ok, reason = _bring_up(root, env)
        if not ok:  # once more: the optimizers may lose a start-up race with OptimizationMind
            print(f"DIRAC bring-up failed, trying once more: {reason[-500:]}")
            subprocess.run(["bash", str(DOWN), str(root)], env=env, capture_output=True, timeout=120)
            ok, reason = _bring_up(root, env)
        if not ok:
            subprocess.run(["bash", str(DOWN), str(root)], env=env, capture_output=True, timeout=120)
            _unavailable(reason)
        try:
            yield root
        finally:
            res = subprocess.run(
                ["bash", str(DOWN), str(root)], env=env, text=True, capture_output=True, timeout=120
            )
            print(res.stdout + res.stderr)
    finally:
        lock.close()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a cold wheel cache makes the first bring-up slow
def test_upstream_benchmark_smoke(bench_dirac: Path, tmp_path: Path) -> None:
    out = tmp_path / "upstream.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "upstream.py"), "--jobs", str(JOBS), "--baseline-jobs", "2",
         "--dirac-dir", str(bench_dirac), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    m = LAST_LINE.match(lines[-1])
    assert m, f"unexpected last line {lines[-1]!r}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert float(m.group(1)) > 0 and float(m.group(4)) > 0, lines[-1]
    figures = json.loads(out.read_text())
    assert figures["accepted"] == JOBS, figures["rows"]
    assert figures["queued"] == JOBS and figures["inputs_cached"] == JOBS, figures
    assert figures["refused_or_failed"] == 0 and not figures["timed_out"], figures["row_errors"]
    assert figures["per_job_ms"]["total"]["n"] == JOBS
    assert figures["baseline_match_ms"]["n"] == 2
    assert proc.returncode == 0, proc.stdout[-3000:]
