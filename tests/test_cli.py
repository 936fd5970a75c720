"""The command line as the README shows it, against a real gateway process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from airlock.cli import build_parser

from .helpers import OPERATOR_TOKEN, PASSWORD
from .live import LiveGateway


def airlock(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    return subprocess.run(
        [sys.executable, "-m", "airlock", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) >= {
        "init",
        "serve",
        "worker",
        "db",
        "submit",
        "status",
        "cancel",
        "volunteer",
        "hosts",
        "report",
        "agent",
        "demo",
    }
    for name in commands:
        r = airlock(name, "--help")
        assert r.returncode == 0 and "usage: airlock" in r.stdout, (name, r.stderr)


def test_init_makes_private_keys_and_is_idempotent(tmp_path: Path) -> None:
    r = airlock("init", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    keys = list((tmp_path / "d" / "keys").iterdir())
    assert {p.name.split("-")[0] for p in keys} == {"token", "operator.token"}
    for p in keys:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in keys}
    assert airlock("init", "--data-dir", str(tmp_path / "d")).returncode == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "d" / "keys").iterdir()} == before


@pytest.mark.slow
def test_operator_workflow_from_the_readme(tmp_path: Path) -> None:
    gw = LiveGateway(tmp_path / "gw").start()
    env = {"AIRLOCK_SERVER": gw.url, "AIRLOCK_OPERATOR_TOKEN": OPERATOR_TOKEN}
    try:
        (tmp_path / "run.py").write_text("open('out.txt', 'w').write('hi')\n")
        (tmp_path / "jobs.yaml").write_text(
            "name: readme\n"
            "defaults:\n"
            "  inputs: [{name: run.py, path: run.py}]\n"
            "  outputs: [{name: out.txt, max_size: 1kB}]\n"
            "jobs:\n"
            "  - {name: a, command: [python3, run.py]}\n"
            "  - {name: b, command: [python3, run.py]}\n"
        )
        r = airlock("submit", str(tmp_path / "jobs.yaml"), env=env)
        assert r.returncode == 0 and "2 jobs submitted" in r.stdout, r.stdout + r.stderr
        (tmp_path / "bad.yaml").write_text(
            "name: x\njobs:\n  - {name: a, command: [x], outputs: [], colour: red}\n"
        )
        r = airlock("submit", str(tmp_path / "bad.yaml"), env=env)
        assert r.returncode == 1 and "colour" in r.stdout, r.stdout
        r = airlock("volunteer", "add", "alice", "--password", PASSWORD, env=env)
        assert r.returncode == 0 and "registered" in r.stdout, r.stdout + r.stderr
        r = airlock("volunteer", "list", env=env)
        assert "alice" in r.stdout and "active" in r.stdout
        r = airlock("volunteer", "block", "1", env=env)
        assert r.returncode == 0
        assert "blocked" in airlock("volunteer", "list", env=env).stdout
        r = airlock("status", env=env)
        assert r.returncode == 0 and "readme" in r.stdout and "queued 2" in r.stdout, r.stdout
        r = airlock("cancel", "1", env=env)
        assert r.returncode == 0 and "cancelled" in r.stdout
        r = airlock("status", "--job", "1", env=env)
        assert '"state": "cancelled"' in r.stdout
        r = airlock("hosts", env={**env, "AIRLOCK_OPERATOR_TOKEN": "wrong"})
        assert r.returncode == 1 and "operator token" in r.stdout
    finally:
        gw.stop()
    r = airlock(
        "report",
        "--data-dir",
        str(tmp_path / "gw"),
        "--html",
        str(tmp_path / "r.html"),
    )  # reading the database needs no operator token
    assert r.returncode == 0 and (tmp_path / "r.html").exists(), r.stdout + r.stderr


def test_a_description_with_a_number_json_cannot_hold_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    """YAML has .inf and .nan, JSON (which carries a description to the gateway) has neither: the
    command says where, and exits 1 without a traceback (the gateway named here does not even exist)."""
    description = tmp_path / "jobs.yaml"
    description.write_text(
        "name: t\njobs:\n  - name: a\n    command: [x]\n    outputs: [{name: o, max_size: 10}]\n"
        "    params: {cuts: [1.5, .nan]}\n"
    )
    r = airlock("submit", str(description), "--server", "http://127.0.0.1:9", "--token", "x")
    assert r.returncode == 1, r.stderr
    out = " ".join((r.stdout + r.stderr).split())  # rich folds long lines
    assert "description.jobs.0.params.cuts.1 is not a number JSON can hold" in out
    assert "Traceback" not in out
