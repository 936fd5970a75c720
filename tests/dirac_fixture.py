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

import contextlib
import fcntl
import json
import os
import re
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
        self,
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        timeout: float = 120,
        check: bool = True,
        tries: int = 3,
    ) -> subprocess.CompletedProcess[str]:
        """Run a DIRAC command line tool (from the venv) as alice. A tool that could not connect to a
        DIRAC service (seen under load: `SSLError(104, 'Connection reset by peer')`, `NoCertificate('peer
        did not return certificate')`) sent it nothing, so it is run again, as alice would, before that
        counts as a failure."""
        cmd = [str(self.python.parent / args[0]), *args[1:]]
        for attempt in range(tries):
            res = subprocess.run(
                cmd,
                cwd=cwd or self.root,
                env=self.tool_env(),
                text=True,
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            if res.returncode == 0 or "Can't connect to dips://" not in res.stdout + res.stderr:
                break
            if attempt + 1 < tries:
                time.sleep(1.0)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def status(self, job_id: int) -> dict[str, str]:
        """The job's state as alice sees it with dirac-wms-job-status."""
        res = self.run(["dirac-wms-job-status", str(job_id)])
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"JobID={job_id} ")), None)
        assert line, f"job {job_id} not in dirac-wms-job-status output:\n{res.stdout}\n{res.stderr}"
        return dict(re.findall(r"(\w+)=([^;]*);", line.split(" ", 1)[1]))

    def wait_status(self, job_id: int, want: str, timeout: float = 90) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st.get("Status") == want:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not reach {want} in {timeout:.0f}s: {st}")
            time.sleep(0.5)

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


@contextlib.contextmanager
def running_dirac(
    name: str, *, default_dir: Path, db_prefix: str, port_base: str, lifetime_s: int
) -> Iterator[Path]:
    """A DIRAC brought up in its own folder for as long as the block runs, held against any other test
    session by a lock file. `name` is the prefix of the environment variables that override where it
    runs: <name>_DIR, <name>_DB_PREFIX, <name>_PORT_BASE. Skips (or, when required, fails) if DIRAC
    cannot be brought up, after one more try (a service may lose a start-up race)."""
    root = Path(os.environ.get(f"{name}_DIR", str(default_dir)))
    root.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(root / ".session.lock", "w")  # noqa: SIM115 - held while the DIRAC is up
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        _unavailable(f"{root} is in use by another test session (set {name}_DIR)")
    env = dict(os.environ)
    env["AIRLOCK_DIRAC_DB_PREFIX"] = os.environ.get(f"{name}_DB_PREFIX", db_prefix)
    env["AIRLOCK_DIRAC_PORT_BASE"] = os.environ.get(f"{name}_PORT_BASE", port_base)
    env.setdefault("AIRLOCK_DIRAC_LIFETIME", str(lifetime_s))  # they end by themselves if we crash
    try:
        ok, reason = _bring_up(root, env)
        if not ok:
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


@pytest.fixture(scope="session")
def dirac_server() -> Iterator[DiracServer]:
    with running_dirac(
        "AIRLOCK_TEST_DIRAC",
        default_dir=Path.home() / ".cache" / "airlock-dirac" / "test-server",
        db_prefix="airlock_test_dirac_",
        port_base="29240",
        lifetime_s=7200,
    ) as root:
        info = json.loads((root / "dirac.json").read_text())
        yield DiracServer(
            root=root,
            python=Path(info["python"]),
            env=dict(info["env"]),
            alice_proxy=Path(info["alice_proxy"]),
            site=str(info["site"]),
            se=str(info["se"]),
            vo=str(info["vo"]),
            info=info,
        )


@pytest.fixture(scope="session")
def dirac_client(dirac_server: DiracServer) -> Iterator[DiracClient]:
    client = dirac_server.client()
    try:
        yield client
    finally:
        client.close()
