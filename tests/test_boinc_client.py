"""Debian's stock BOINC client against a real gateway: two headless clients in private folders, attached
with `boinccmd` and the account keys that `boinccmd --lookup_account` gets from the gateway, take a batch
to trusted storage; one job is cancelled by the operator and aborted on its client; one client is killed
mid-task and its task is finished by the other after the deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.demo.boinc_clients import BoincHost, boinc_available

from .helpers import PASSWORD
from .live import LiveGateway

pytestmark = pytest.mark.slow


def _require_boinc() -> None:
    reason = boinc_available()
    if reason is None:
        return
    if os.environ.get("CI") == "true" or os.environ.get("AIRLOCK_TEST_POSTGRES") == "required":
        pytest.fail(reason + " (required in CI)")
    print(f"SKIP boinc: {reason}")
    pytest.skip(reason)


def airlock(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    r = subprocess.run([sys.executable, "-m", "airlock", *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def wait_for(what: str, check: Callable[[], Any], timeout: float, poke: Callable[[], None]) -> Any:
    deadline = time.monotonic() + timeout
    last_poke = 0.0
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if time.monotonic() - last_poke > 3:
            poke()
            last_poke = time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_gateway(tmp_path: Path, app: str = "airlock_wrapper", **settings: str) -> LiveGateway:
    """A gateway with `app` signed (the shipped wrapper) by a key made offline with the real commands."""
    _require_boinc()
    keys = tmp_path / "offline-keys"
    airlock("boinc", "keygen", "--out", str(keys))
    data = tmp_path / "gw"
    airlock("boinc", "sign-app", "--data-dir", str(data), "--key", str(keys / "code_sign_private.pem"),
            "--app", app, "--version", "100", "--wrapper")  # fmt: skip
    return LiveGateway(data, retry_after_s="2", boinc_next_rpc_delay_s="5", **settings).start()


def client_env() -> dict[str, str]:
    """The clients find this venv's python3 (the payloads' numpy) and `airlock` (the pilots' agent)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[LiveGateway]:
    gw = start_gateway(tmp_path, boinc_abort_ack_delay_s="10")
    yield gw
    gw.stop()


def volunteer(op: httpx.Client, name: str) -> str:
    r = op.post(
        "/api/v1/volunteers", json={"name": name, "password": PASSWORD, "email": f"{name}@example.org"}
    )
    assert r.status_code == 201, r.text
    return f"{name}@example.org"


def job(name: str, seconds: float, deadline_s: int = 600) -> dict[str, Any]:
    script = f"import time; time.sleep({seconds}); open('out.txt', 'w').write('{name} done\\n')"
    return {
        "name": name,
        "command": ["python3", "-c", script],
        "outputs": [{"name": "out.txt", "max_size": 1000}],
        "resources": {"runtime_s": max(5, int(seconds))},
        "deadline_s": deadline_s,
        "max_attempts": 3,
    }


def running_task(host: BoincHost) -> str | None:
    for t in host.tasks():
        if t.get("active_task_state") == "EXECUTING":
            return t.get("name")
    return None


# ~140 s alone; its waits are the BOINC client's own (RPC delays, deadlines), and they stretch when
# the suite's other workers share the two cores
@pytest.mark.timeout(600)
def test_two_boinc_clients_take_a_batch_to_trusted_storage(gateway: LiveGateway, tmp_path: Path) -> None:
    url = gateway.url + "/boinc/"
    hosts = [BoincHost(tmp_path / f"client{i}", ncpus=1, env=client_env()).start() for i in range(2)]
    try:
        with gateway.op() as op:
            for i, host in enumerate(hosts):
                email = volunteer(op, f"vol{i}")
                authenticator = host.lookup_account(url, email, PASSWORD)
                assert len(authenticator) == 32, authenticator
                host.attach(url, authenticator)

            def poke() -> None:
                for h in hosts:
                    if h.proc is not None and h.proc.poll() is None:
                        h.update(url)

            # Two long jobs, one per client: one will be cancelled, the other's client killed.
            first = op.post("/api/v1/batches", json={"name": "long", "jobs": [
                job("cancel-me", 600), job("survive-a-crash", 12, deadline_s=45)]}).json()  # fmt: skip
            cancel_id, crash_id = first["jobs"]
            running = wait_for(
                "both clients to run a task",
                lambda: all(running_task(h) for h in hosts) and [running_task(h) for h in hosts],
                120,
                poke,
            )
            by_job = {int(name.split("_")[1]): h for name, h in zip(running, hosts, strict=True)}
            cancelled_host, crashed_host = by_job[cancel_id], by_job[crash_id]
            # A client dies mid-task, at once (the cancel below takes longer than that task's 12 s);
            # the other client finishes the task once its deadline has passed.
            crashed_host.kill()

            # The operator cancels a job: its client is told to abort, and the app dies at once.
            assert op.post(f"/api/v1/jobs/{cancel_id}/cancel").status_code == 200
            wait_for("the abort to reach the client", lambda: running_task(cancelled_host) is None, 60, poke)
            wait_for(
                "the aborted result to be acknowledged and forgotten",
                lambda: not any(f"airlock_{cancel_id}_" in t.get("name", "") for t in cancelled_host.tasks()),
                90,
                poke,
            )

            def done(jobs: list[int]) -> Callable[[], bool]:
                def check() -> bool:
                    states = [op.get(f"/api/v1/jobs/{j}").json()["state"] for j in jobs]
                    assert "failed" not in states, states
                    return all(s == "done" for s in states)

                return check

            # The crashed client's task is reissued once its deadline has passed, and the other client
            # runs it. Only then more work: queued behind it on a one-CPU client, on a loaded machine,
            # the reissued task could pass its own deadline before it starts (the client aborts it).
            wait_for("the crashed client's job to be done by the other", done([crash_id]), 240, poke)
            quick = op.post("/api/v1/batches", json={"name": "quick", "jobs": [
                job(f"quick-{i}", 1) for i in range(3)]}).json()["jobs"]  # fmt: skip
            wait_for("every job to be done", done(quick), 240, poke)
            want = [crash_id, *quick]
            assert op.get(f"/api/v1/jobs/{cancel_id}").json()["state"] == "cancelled"
            for j in want:
                view = op.get(f"/api/v1/jobs/{j}").json()
                r = op.get(f"/api/v1/jobs/{j}/outputs/out.txt")
                assert r.status_code == 200 and r.text == f"{view['name']} done\n", r.text
            tasks = op.get(f"/api/v1/jobs/{crash_id}").json()["tasks"]
            states = sorted(t["state"] for t in tasks)
            assert states == ["lost", "valid"], tasks
            hosts_by_state = {t["state"]: t["host_id"] for t in tasks}
            assert hosts_by_state["lost"] != hosts_by_state["valid"]
    except BaseException:
        for h in hosts:
            print(f"--- {h.folder} messages ---\n{h.messages()[-4000:]}")
        print(f"--- gateway log ---\n{gateway.log_path.read_text()[-4000:]}")
        raise
    finally:
        for h in hosts:
            h.stop()


def test_vacuum_pilots_run_the_agent_inside_boinc(tmp_path: Path) -> None:
    """CMS@home's model inside BOINC: the client runs a pilot, the pilot runs the Airlock agent with the
    token from the project-specific preferences, the agent pulls and finishes the tasks."""
    gateway = start_gateway(tmp_path, "airlock_vacuum", boinc_vacuum="true")
    url = gateway.url + "/boinc/"
    host = BoincHost(tmp_path / "client", ncpus=1, env=client_env()).start()
    try:
        with gateway.op() as op:
            email = volunteer(op, "pilot-volunteer")
            vid = next(v["id"] for v in op.get("/api/v1/volunteers").json() if v["name"] == "pilot-volunteer")
            jobs = op.post("/api/v1/batches", json={"name": "vacuum", "jobs": [
                job(f"v{i}", 1) for i in range(3)]}).json()["jobs"]  # fmt: skip
            host.attach(url, host.lookup_account(url, email, PASSWORD))

            def all_done() -> bool:
                return all(op.get(f"/api/v1/jobs/{j}").json()["state"] == "done" for j in jobs)

            wait_for("the pilot's agent to finish every job", all_done, 180, lambda: host.update(url))
            agent_hosts = {h["id"]: h for h in op.get("/api/v1/hosts").json()}
            for j in jobs:
                (task,) = [t for t in op.get(f"/api/v1/jobs/{j}").json()["tasks"] if t["state"] == "valid"]
                assert task["volunteer_id"] == vid
                assert agent_hosts[task["host_id"]]["name"].endswith("(BOINC pilot)")
            wait_for(
                "the pilot to end and its result to be acknowledged",
                lambda: not host.tasks(),
                120,
                lambda: host.update(url),
            )
    except BaseException:
        print(f"--- client messages ---\n{host.messages()[-4000:]}")
        print(f"--- gateway log ---\n{gateway.log_path.read_text()[-3000:]}")
        raise
    finally:
        host.stop()
        gateway.stop()
