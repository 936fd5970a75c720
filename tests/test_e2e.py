"""End to end over real HTTP with real agents in bubblewrap (slow; run in CI by `make test`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import PASSWORD
from .live import LiveGateway

pytestmark = pytest.mark.slow


def _bwrap_ok() -> bool:
    from airlock.demo.run import sandbox_available

    ok = sandbox_available()
    if not ok and os.environ.get("CI") == "true":
        pytest.fail("bubblewrap cannot create a sandbox on this CI machine")
    return ok


def test_demo_small_batch_all_done_and_nothing_tampered(tmp_path: Path) -> None:
    """The demo itself, smaller: misbehaving agents included, every job done, no tampered output stored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "airlock",
            "demo",
            "--jobs",
            "12",
            "--events",
            "500",
            "--work-dir",
            str(tmp_path / "d"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    m = re.search(
        r"jobs done: (\d+)/(\d+)\s+outputs re-derived and compared: (\d+), tampered or wrong in\s+"
        r"trusted storage: (\d+)",
        out,
    )
    assert m, out[-3000:]
    assert m.groups() == ("12", "12", "12", "0")
    assert (tmp_path / "d" / "report.html").stat().st_size > 10_000
    html = (tmp_path / "d" / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert "no drift" in out


def test_agent_backs_off_while_gateway_is_down_and_finishes_after(tmp_path: Path) -> None:
    sandbox = _bwrap_ok()
    gw = LiveGateway(tmp_path / "gw", lease_s="600", retry_after_s="1").start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        with gw.op() as op:
            script = (
                b"import sys, time\ntime.sleep(float(sys.argv[1]))\nopen('out.txt','w').write(sys.argv[2])\n"
            )
            sha = op.post("/api/v1/inputs", content=script).json()["sha256"]
            jobs = [
                {
                    "name": f"j{i}",
                    "command": ["python3", "s.py", "1.5", f"r{i}"],
                    "inputs": [{"name": "s.py", "sha256": sha}],
                    "outputs": [{"name": "out.txt", "max_size": 100}],
                }
                for i in range(4)
            ]
            batch = op.post("/api/v1/batches", json={"name": "b", "jobs": jobs}).json()
            assert (
                op.post("/api/v1/volunteers", json={"name": "alice", "password": PASSWORD}).status_code == 201
            )
        cmd = [
            sys.executable,
            "-m",
            "airlock",
            "agent",
            "--server",
            gw.url,
            "--user",
            "alice",
            "--password",
            PASSWORD,
            "--work-dir",
            str(tmp_path / "agent"),
            "--poll-max",
            "1",
        ]
        if not sandbox:
            cmd.append("--no-sandbox")
        log = (tmp_path / "agent.log").open("wb")
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(3)  # the agent is in its first task
        gw.stop()
        time.sleep(4)  # it finishes the payload, cannot upload or report: it must back off, not give up
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        gw.start()
        deadline = time.monotonic() + 90
        done = 0
        with gw.op() as op:
            while time.monotonic() < deadline:
                done = op.get(f"/api/v1/batches/{batch['batch_id']}").json()["jobs_by_state"].get("done", 0)
                if done == 4:
                    break
                time.sleep(0.5)
            assert done == 4, (tmp_path / "agent.log").read_text()[-3000:]
            for jid in batch["jobs"]:
                job = op.get(f"/api/v1/jobs/{jid}").json()
                assert len(job["tasks"]) == 1  # nothing was lost or redone
                out = op.get(f"/api/v1/jobs/{jid}/outputs/out.txt")
                assert out.content == f"r{jid - batch['jobs'][0]}".encode()
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=20)
        gw.stop()
