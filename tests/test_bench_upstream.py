"""The upstream benchmark runs end to end against a real local DIRAC 9.1 (a tiny run, not a measurement).

Its DIRAC is its own: AIRLOCK_TEST_BENCH_DIRAC_DIR (default ~/.cache/airlock-dirac/bench-server, whose
venv and certificates are reused between runs), ports from AIRLOCK_TEST_BENCH_DIRAC_PORT_BASE (29640),
databases prefixed AIRLOCK_TEST_BENCH_DIRAC_DB_PREFIX (``airlock_benchtest_dirac_``). As for the other
DIRAC tests, if it cannot be brought up the test is skipped with the reason printed, or fails when
AIRLOCK_TEST_DIRAC=required.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .dirac_fixture import running_dirac

REPO = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(
    r"^upstream: (\d+\.\d) jobs/s, gateway overhead (\d+\.\d) ms/job "
    r"\((\d+\.\d\d) x the matcher's (\d+\.\d) ms\), p99 (\d+) ms$"
)
JOBS = 5


@pytest.fixture(scope="module")
def bench_dirac() -> Iterator[Path]:
    """A DIRAC of its own: the benchmark refuses one that still has jobs queued."""
    with running_dirac(
        "AIRLOCK_TEST_BENCH_DIRAC",
        default_dir=Path.home() / ".cache" / "airlock-dirac" / "bench-server",
        db_prefix="airlock_benchtest_dirac_",
        port_base="29640",
        lifetime_s=3600,
    ) as root:
        yield root


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
