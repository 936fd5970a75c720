"""The credentials benchmark runs end to end against a real `airlock serve` (a short run, no measurement)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(r"^credentials: (\d+) tokens/s, (\d+) proxies/s \((targets met|below target)\)$")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_credentials_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "credentials.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "credentials.py"), "--seconds", "1", "--warmup", "0.2",
         "--connections", "4", "--workers", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout
    results = json.loads(out.read_text())
    for what in ("tokens", "proxies"):
        assert results[what]["failed"] == 0
        assert results[what]["ok"] > 0 and results[what]["baseline_per_s"] > results[what]["per_s"] > 0
    assert int(match.group(1)) == round(results["tokens"]["per_s"])
