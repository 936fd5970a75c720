"""A real, local DIRAC 9.1.22 server for the DIRAC upstream tests (session scoped).

``scripts/dirac/up.sh DIR`` brings it up (venv, certificates, dirac.cfg, MariaDB schemas, services) and
``scripts/dirac/down.sh DIR`` stops it at the end of the session. DIR is AIRLOCK_TEST_DIRAC_DIR, by
default ~/.cache/airlock-dirac/test-server, so the venv and certificates are reused between sessions;
the databases (prefix AIRLOCK_TEST_DIRAC_DB_PREFIX, default ``airlock_test_dirac_``) are re-created by
every bring-up. Ports: AIRLOCK_TEST_DIRAC_PORT_BASE (default 29240, ten ports from there).

If DIRAC cannot be brought up, the tests are skipped with the reason printed -- or fail when
AIRLOCK_TEST_DIRAC=required (as CI sets it).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from airlock.upstream.dirac_client import DiracClient

REPO = Path(__file__).resolve().parent.parent
UP = REPO / "scripts" / "dirac" / "up.sh"
DOWN = REPO / "scripts" / "dirac" / "down.sh"


def _required() -> bool:
    return os.environ.get("AIRLOCK_TEST_DIRAC") == "required"


@dataclass
class DiracServer:
    root: Path
    python: Path
    env: dict[str, str]
    alice_proxy: Path
    site: str
    se: str
    vo: str
    info: dict[str, object] = field(repr=False)

    def tool_env(self, *, as_alice: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "DIRAC"))}
        env.update(self.env)
        env["PATH"] = f"{self.python.parent}:{env.get('PATH', '/usr/bin:/bin')}"
        if as_alice:
            env["X509_USER_PROXY"] = str(self.alice_proxy)
        return env

    def run(
        self, args: Sequence[str], *, cwd: Path | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a DIRAC command line tool (from the venv) as alice."""
        cmd = [str(self.python.parent / args[0]), *args[1:]]
        res = subprocess.run(
            cmd,
            cwd=cwd or self.root,
            env=self.tool_env(),
            text=True,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def client(self, *, timeout: float = 120.0, log_name: str = "worker-test.log") -> DiracClient:
        return DiracClient(self.python, self.env, timeout=timeout, stderr=str(self.root / "logs" / log_name))


def _bring_up(root: Path, env: dict[str, str]) -> tuple[bool, str]:
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            ["bash", str(UP), str(root)],
            env=env,
            text=True,
            capture_output=True,
            timeout=float(os.environ.get("AIRLOCK_TEST_DIRAC_UP_TIMEOUT", "1200")),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"up.sh did not finish: {exc}"
    (root / "up.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        tail = (res.stdout[-2500:] + "\n" + res.stderr[-2500:]).strip()
        return False, f"up.sh failed ({res.returncode}) after {time.monotonic() - t0:.0f}s:\n{tail}"
    print(f"DIRAC up in {time.monotonic() - t0:.0f}s ({root})")
    return True, ""


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"DIRAC could not be brought up (required here): {reason}", pytrace=False)
    print(f"SKIP dirac: {reason}")
    pytest.skip(f"DIRAC could not be brought up: {reason}")


@pytest.fixture(scope="session")
def dirac_server() -> Iterator[DiracServer]:
    root = Path(
        os.environ.get(
            "AIRLOCK_TEST_DIRAC_DIR", str(Path.home() / ".cache" / "airlock-dirac" / "test-server")
        )
    )
    root.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(root / ".session.lock", "w")  # noqa: SIM115 - held for the session
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        _unavailable(f"{root} is in use by another test session (set AIRLOCK_TEST_DIRAC_DIR)")
    env = dict(os.environ)
    env["AIRLOCK_DIRAC_DB_PREFIX"] = os.environ.get("AIRLOCK_TEST_DIRAC_DB_PREFIX", "airlock_test_dirac_")
    env["AIRLOCK_DIRAC_PORT_BASE"] = os.environ.get("AIRLOCK_TEST_DIRAC_PORT_BASE", "29240")
    env.setdefault("AIRLOCK_DIRAC_LIFETIME", "7200")  # the services end by themselves even if we crash
    try:
        ok, reason = _bring_up(root, env)
        if not ok:
            subprocess.run(["bash", str(DOWN), str(root)], env=env, capture_output=True, timeout=120)
            _unavailable(reason)
        info = json.loads((root / "dirac.json").read_text())
        server = DiracServer(
            root=root,
            python=Path(info["python"]),
            env=dict(info["env"]),
            alice_proxy=Path(info["alice_proxy"]),
            site=str(info["site"]),
            se=str(info["se"]),
            vo=str(info["vo"]),
            info=info,
        )
        try:
            yield server
        finally:
            res = subprocess.run(
                ["bash", str(DOWN), str(root)], env=env, text=True, capture_output=True, timeout=120
            )
            print(res.stdout + res.stderr)
    finally:
        lock.close()


@pytest.fixture(scope="session")
def dirac_client(dirac_server: DiracServer) -> Iterator[DiracClient]:
    client = dirac_server.client()
    try:
        yield client
    finally:
        client.close()
