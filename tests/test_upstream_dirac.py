"""The gateway with DIRAC as its upstream, end to end against a real local DIRAC 9.1.22 (slow).

alice submits with DIRAC's own command line tools; the gateway's background loops (one pass each with
``api.loops()``) match her job with the BOINC site's resource description, cache its input sandbox,
create the Airlock job and report to DIRAC; an in-process volunteer really runs the payload on the
inputs it downloads from the gateway; after validation and assimilation the gateway uploads the output
sandbox as alice (her proxy from the configured folder) and registers the output file, and alice sees
the job Done and gets its output with dirac-wms-job-get-output. No part of DIRAC is mocked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import select

from airlock.boinc.apps import sign_app, wrapper_path
from airlock.boinc.signing import generate_key, private_pem
from airlock.core.checksums import digest_bytes
from airlock.db import schema
from airlock.db.engine import read
from airlock.upstream.base import UpstreamError
from airlock.upstream.dirac import DiracUpstream
from airlock.upstream.dirac_client import DiracClient
from airlock.upstream.registry import set_upstream_sync, upstream_sync
from airlock.upstream.sync import UpstreamSync, trace, upstream_of_job

from .helpers import Api, Volunteer
from .test_boinc_project import Client

if TYPE_CHECKING:  # the fixtures come from tests/dirac_fixture.py, a plugin of tests/conftest.py
    from .dirac_fixture import DiracServer


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test here is the conversation with DIRAC, not the database."""
    yield f"sqlite:///{tmp_path / 'airlock.db'}"


@pytest.fixture
def settings_overrides(dirac_server: DiracServer, tmp_path: Path) -> dict[str, Any]:
    proxies = tmp_path / "owner-proxies"
    proxies.mkdir(mode=0o700)
    shutil.copyfile(dirac_server.alice_proxy, proxies / "alice.proxy")
    (proxies / "alice.proxy").chmod(0o600)
    return {
        "upstream": "dirac",
        "dirac_dir": dirac_server.root,
        "dirac_site": dirac_server.site,
        "dirac_owner_proxy_dir": proxies,
        "dirac_output_se": dirac_server.se,
        "dirac_heartbeat_interval_s": 0,
        "dirac_max_input_bytes": 10**6,
    }


@pytest.fixture
def gateway(api: Api, dirac_client: DiracClient) -> Api:
    """The gateway of `api`, its upstream loops talking to the session's DIRAC."""
    set_upstream_sync(api.gw, UpstreamSync(api.gw, DiracUpstream(api.gw.settings, client=dirac_client)))
    return api


def submit(server: DiracServer, workdir: Path, name: str, **jdl: str) -> tuple[int, str]:
    """alice submits a JDL job (input sandbox in.txt + run.sh) with dirac-wms-job-submit."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "in.txt").write_text(f"input of {name}\n")
    (workdir / "run.sh").write_text('#!/bin/sh\necho "$1" > result.txt\ncat in.txt\n')
    out_path = f"/airlock/out/{uuid.uuid4().hex[:12]}"
    attrs = {
        "JobName": f'"{name}"',
        "Executable": '"/bin/sh"',
        "Arguments": '"run.sh 42"',
        "InputSandbox": '{"in.txt", "run.sh"}',
        "OutputSandbox": '{"result.txt", "std.out"}',
        "OutputData": '{"result.txt"}',
        "OutputSE": '"BOINC-SE"',
        "OutputPath": f'"{out_path}"',
        "CPUTime": "3600",
    }
    attrs.update(jdl)
    body = "".join(f"  {k} = {v};\n" for k, v in attrs.items())
    (workdir / "job.jdl").write_text("[\n" + body + "]\n")
    res = server.run(["dirac-wms-job-submit", "job.jdl"], cwd=workdir)
    m = re.search(r"JobID\s*=\s*(\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    return int(m.group(1)), out_path


def row_of(api: Api, job_id: int) -> Any:
    u = schema.upstream_jobs
    with read(api.gw.engine) as conn:
        return conn.execute(select(u).where(u.c.ref == str(job_id)).order_by(u.c.attempt.desc())).first()


def loops_until(api: Api, server: DiracServer, job_id: int, want: str, rounds: int = 20) -> dict[str, str]:
    for _ in range(rounds):
        api.loops()
        st = server.status(job_id)
        if st.get("Status") == want:
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never {want}: {server.status(job_id)}; row {row_of(api, job_id)}")


def run_task(api: Api, v: Volunteer, task: dict[str, Any], workdir: Path) -> dict[str, bytes]:
    """An honest volunteer: download the inputs from the gateway, run the command, upload, report."""
    workdir.mkdir(parents=True)
    for inp in task["inputs"]:
        r = api.client.get(inp["url"].replace("http://testserver", ""), headers=v.auth)
        assert r.status_code == 200, r.text
        (workdir / inp["name"]).write_bytes(r.content)
    res = subprocess.run(task["command"], cwd=workdir, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert res.returncode == 0
    outputs = {o["name"]: (workdir / o["name"]).read_bytes() for o in task["outputs"]}
    for name, data in outputs.items():
        assert v.upload(task, data, name).status_code in (200, 201)
    assert v.report(task, 0, outputs).status_code == 200
    return outputs


CREDENTIAL_MARKERS = (
    "-----BEGIN",
    "PRIVATE KEY",
    "CERTIFICATE",
    ".proxy",
    "proxy.pem",
    "X509_",
    "DIRACSYSCONFIG",
)


def assert_no_credentials(text: str, server: DiracServer) -> None:
    for marker in CREDENTIAL_MARKERS:
        assert marker not in text, marker
    proxy = server.alice_proxy.read_text()
    for line in proxy.splitlines():
        if len(line) > 40:  # any line of the PEM body
            assert line not in text


def test_a_dirac_job_runs_on_a_volunteer_and_alice_gets_its_output(
    gateway: Api, dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    api = gateway
    job_id, out_path = submit(dirac_server, tmp_path / "alice", "airlock-e2e")
    dirac_server.wait_status(job_id, "Waiting")

    # the generator matches it, caches the sandbox, creates the job, reports to DIRAC
    loops_until(api, dirac_server, job_id, "Running")
    row = row_of(api, job_id)
    assert row is not None and row.state == "accepted", row
    st = dirac_server.status(job_id)
    assert (st["Status"], st["MinorStatus"]) == ("Running", "Job accepted by Airlock"), st
    with read(api.gw.engine) as conn:
        batch = conn.execute(select(schema.batches).where(schema.batches.c.id == row.batch_id)).one()
    assert (batch.upstream, batch.upstream_ref, batch.owner) == ("dirac", str(job_id), "alice")

    v = api.volunteer()
    r = v.request()
    assert r.status_code == 200
    (task,) = r.json()["tasks"]
    assert_no_credentials(r.text, dirac_server)
    assert {i["name"] for i in task["inputs"]} == {"in.txt", "run.sh"}
    api.loops()
    st = dirac_server.status(job_id)
    assert (st["Status"], st["MinorStatus"]) == ("Running", "Application"), st
    hb = v.heartbeat(task)
    assert hb.status_code == 200 and hb.json()["abort"] is False
    assert_no_credentials(hb.text, dirac_server)

    outputs = run_task(api, v, task, tmp_path / "volunteer")
    assert outputs["result.txt"] == b"42\n"
    assert outputs["std.out"] == b"input of airlock-e2e\n"
    st = loops_until(api, dirac_server, job_id, "Done")
    assert st["MinorStatus"] == "Execution Complete"
    row = row_of(api, job_id)
    assert row.state == "done"
    assert dirac_client.output_sandboxes(job_id, owner_proxy=dirac_server.alice_proxy) == [row.sandbox_ref]

    # alice retrieves the output sandbox with DIRAC's tool, and the output file is registered
    fetch = tmp_path / "alice-out"
    fetch.mkdir()
    dirac_server.run(["dirac-wms-job-get-output", str(job_id)], cwd=fetch)
    assert (fetch / str(job_id) / "result.txt").read_bytes() == b"42\n"
    assert (fetch / str(job_id) / "std.out").read_bytes() == b"input of airlock-e2e\n"
    lfn = f"{out_path}/result.txt"
    res = dirac_server.run(["dirac-dms-lfn-replicas", lfn])
    assert "BOINC-SE" in res.stdout, res.stdout
    back = tmp_path / "back"
    back.mkdir()
    dirac_server.run(["dirac-dms-get-file", lfn], cwd=back)
    assert (back / "result.txt").read_bytes() == b"42\n"

    # traceability: DIRAC job -> Airlock job, tasks, volunteers, hosts; and back
    with read(api.gw.engine) as conn:
        (attempt,) = trace(conn, "dirac", str(job_id))
        assert upstream_of_job(conn, attempt["job_id"])["ref"] == str(job_id)  # type: ignore[index]
    assert [(t["id"], t["volunteer_id"], t["host_id"]) for t in attempt["tasks"]] == [
        (task["task_id"], v.id, v.host_id)
    ]
    params = dirac_server.run(["dirac-wms-job-parameters", str(job_id)]).stdout
    print(params)
    assert re.search(rf"AirlockJob\W+{attempt['job_id']}\b", params), params
    assert re.search(rf"AirlockHosts\W+{v.host_id}\b", params), params
    assert re.search(rf"AirlockTasks\W+{task['task_id']}\b", params), params

    # a second pass changes nothing in DIRAC
    api.settle()
    assert dirac_server.status(job_id)["Status"] == "Done"


def test_a_kill_in_dirac_aborts_the_volunteer_task(
    gateway: Api, dirac_server: DiracServer, tmp_path: Path
) -> None:
    api = gateway
    job_id, _ = submit(dirac_server, tmp_path / "alice", "airlock-kill")
    dirac_server.wait_status(job_id, "Waiting")
    loops_until(api, dirac_server, job_id, "Running")
    v = api.volunteer()
    (task,) = v.work()
    api.loops()
    assert dirac_server.status(job_id)["Status"] == "Running"
    res = dirac_server.run(["dirac-wms-job-kill", str(job_id)])
    assert "killed" in res.stdout.lower(), res.stdout
    api.loops()  # the heartbeat brings the Kill: the Airlock job is cancelled, its task aborted
    row = row_of(api, job_id)
    assert row.state == "killed"
    assert api.job(row.job_id)["state"] == "cancelled"
    hb = v.heartbeat(task)
    assert hb.status_code == 200 and hb.json()["abort"] is True
    api.settle()
    assert dirac_server.status(job_id)["Status"] == "Killed"


def test_jdl_airlock_cannot_run_is_refused_back_to_dirac(
    gateway: Api, dirac_server: DiracServer, tmp_path: Path
) -> None:
    api = gateway
    bad_exe, _ = submit(dirac_server, tmp_path / "a", "airlock-bad-exe", Executable='"my-binary"')
    gpu, _ = submit(dirac_server, tmp_path / "b", "airlock-gpu", Tags='{"GPU"}')
    big, _ = submit(dirac_server, tmp_path / "c", "airlock-big")
    # the sandbox of `big` is too large for volunteers' links (the test gateway caps inputs at 1 MB)
    for jid in (bad_exe, gpu, big):
        dirac_server.wait_status(jid, "Waiting")
    api.gw.settings = api.gw.settings.model_copy(update={"dirac_max_input_bytes": 10})
    sync = upstream_sync(api.gw)
    assert sync is not None
    up = sync.upstream
    downloaded: list[str] = []
    download = up.download_inputs

    def counting_download(job: Any, dest: Path) -> list[Path]:
        downloaded.append(job.ref)
        return download(job, dest)

    up.download_inputs = counting_download  # type: ignore[method-assign]
    jobs_before = api.count(schema.jobs)
    # (a job just Waiting may miss a pass of the Matcher: the loops run until DIRAC shows the outcome)
    st = loops_until(api, dirac_server, bad_exe, "Failed")
    st_big = loops_until(api, dirac_server, big, "Failed")
    assert api.count(schema.jobs) == jobs_before
    assert st["Status"] == "Failed" and st["MinorStatus"].startswith(
        "Airlock: unknown executable 'my-binary'"
    ), st
    st = dirac_server.status(gpu)
    # a GPU tag keeps the job off this site in the Matcher, or Airlock refuses it
    assert st["Status"] in ("Waiting", "Failed"), st
    if st["Status"] == "Failed":
        assert "Tags GPU" in st["MinorStatus"], st
    st = st_big
    assert st["Status"] == "Failed" and st["MinorStatus"].startswith(
        "Airlock: inputs too large for volunteers' links"
    ), st
    assert "(before download)" in st["MinorStatus"], st
    assert str(big) not in downloaded, "refused from DIRAC's sizes: nothing downloaded"
    if dirac_server.status(gpu)["Status"] == "Waiting":
        dirac_server.run(["dirac-wms-job-kill", str(gpu)])


def test_a_boinc_client_gets_no_dirac_credential(
    gateway: Api, dirac_server: DiracServer, tmp_path: Path
) -> None:
    api = gateway
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "key.pem").write_bytes(private_pem(generate_key()))
    sign_app(offline / "key.pem", api.gw.settings.data_dir, "airlock_wrapper", 100, [wrapper_path()])
    job_id, _ = submit(dirac_server, tmp_path / "alice", "airlock-boinc")
    dirac_server.wait_status(job_id, "Waiting")
    loops_until(api, dirac_server, job_id, "Running")  # accepted: reported Running upstream
    assert row_of(api, job_id).state == "accepted"
    client = Client(api, name="bob", email="bob@example.org")
    reply = client.rpc()
    text = ET.tostring(reply, encoding="unicode")
    assert reply.find("workunit") is not None, text
    assert_no_credentials(text, dirac_server)
    # the workunit's input files are the sandbox's, served from the cache by digest
    sha = digest_bytes(b"input of airlock-boinc\n").sha256
    assert sha in text
    with read(api.gw.engine) as conn:
        job = conn.execute(select(schema.jobs).where(schema.jobs.c.id == row_of(api, job_id).job_id)).one()
        from airlock.scheduler.replication import cancel_job

        with api.gw.engine.begin() as wconn:
            cancel_job(wconn, job.id, "test")
    api.settle()
    assert dirac_server.status(job_id)["Status"] == "Failed"


class CrashingDirac(DiracUpstream):
    """The real DIRAC upstream, with the gateway 'dying' right after an operation took effect in DIRAC
    (before the gateway could record it): the next pass must redo it without duplicating it."""

    crash_after: set[str]
    pfns: list[str]

    def upload_output_sandbox(self, job: Any, files: Any) -> str | None:
        pfn = super().upload_output_sandbox(job, files)
        self.pfns.append(str(pfn))
        if "sandbox" in self.crash_after:
            self.crash_after.discard("sandbox")
            # newer mtimes make a second upload a different archive: DIRAC's dedupe cannot hide it
            later = time.time() + 3600
            for f in files:
                os.utime(f, (later, later))
            raise UpstreamError("crash after the sandbox upload (injected)")
        return pfn

    def register_output(self, job: Any, output: Any, path: Path) -> None:
        super().register_output(job, output, path)
        if "register" in self.crash_after:
            self.crash_after.discard("register")
            raise UpstreamError("crash after the registration (injected)")


def test_a_crash_midway_through_the_hand_back_redoes_without_duplicating(
    api: Api, dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    up = CrashingDirac(api.gw.settings, client=dirac_client)
    up.crash_after, up.pfns = {"sandbox", "register"}, []
    set_upstream_sync(api.gw, UpstreamSync(api.gw, up))
    job_id, out_path = submit(dirac_server, tmp_path / "alice", "airlock-crash")
    dirac_server.wait_status(job_id, "Waiting")
    loops_until(api, dirac_server, job_id, "Running")
    v = api.volunteer()
    (task,) = v.work()
    run_task(api, v, task, tmp_path / "volunteer")
    api.settle()  # validated, assimilated; the hand-back 'crashes' twice and is redone
    st = loops_until(api, dirac_server, job_id, "Done")
    assert st["MinorStatus"] == "Execution Complete"
    assert up.crash_after == set()
    # the redo found the sandbox the 'crashed' upload left in DIRAC and did not upload another
    assert len(up.pfns) == 1, up.pfns
    held = dirac_client.output_sandboxes(job_id, owner_proxy=dirac_server.alice_proxy)
    assert held == up.pfns, held
    assert row_of(api, job_id).sandbox_ref == up.pfns[0]
    res = dirac_server.run(["dirac-dms-lfn-replicas", f"{out_path}/result.txt"])
    assert res.stdout.count("BOINC-SE") == 1, res.stdout
    fetch = tmp_path / "alice-out"
    fetch.mkdir()
    dirac_server.run(["dirac-wms-job-get-output", str(job_id)], cwd=fetch)
    assert (fetch / str(job_id) / "result.txt").read_bytes() == b"42\n"


def test_a_real_gateway_and_a_real_agent_run_alice_s_dirac_job(
    dirac_server: DiracServer, tmp_path: Path
) -> None:
    """The whole BelleII@home path with nothing in process: `airlock serve` pulling from DIRAC with its
    own loops, a real `airlock agent` (in bubblewrap where it can) running the job, and alice getting
    output and replica with DIRAC's tools."""
    from .live import LiveGateway
    from .test_e2e import _bwrap_ok

    sandbox = _bwrap_ok()
    proxies = tmp_path / "owner-proxies"
    proxies.mkdir(mode=0o700)
    shutil.copyfile(dirac_server.alice_proxy, proxies / "alice.proxy")
    (proxies / "alice.proxy").chmod(0o600)
    gw = LiveGateway(
        tmp_path / "gw",
        upstream="dirac",
        dirac_dir=str(dirac_server.root),
        dirac_site=dirac_server.site,
        dirac_owner_proxy_dir=str(proxies),
        dirac_output_se=dirac_server.se,
        dirac_poll_interval_s="1",
        dirac_heartbeat_interval_s="0",
    ).start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        with gw.op() as op:
            r = op.post("/api/v1/volunteers", json={"name": "vera", "password": "correct horse battery"})
            assert r.status_code == 201, r.text
        job_id, out_path = submit(dirac_server, tmp_path / "alice", "airlock-live")
        cmd = [sys.executable, "-m", "airlock", "agent", "--server", gw.url, "--user", "vera",
               "--password", "correct horse battery", "--work-dir", str(tmp_path / "agent"),
               "--poll-max", "1"]  # fmt: skip
        if not sandbox:
            cmd.append("--no-sandbox")
        log = (tmp_path / "agent.log").open("wb")
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        st = dirac_server.wait_status(job_id, "Done", timeout=240)
        assert st["MinorStatus"] == "Execution Complete", st
        fetch = tmp_path / "alice-out"
        fetch.mkdir()
        dirac_server.run(["dirac-wms-job-get-output", str(job_id)], cwd=fetch)
        assert (fetch / str(job_id) / "result.txt").read_bytes() == b"42\n"
        res = dirac_server.run(["dirac-dms-lfn-replicas", f"{out_path}/result.txt"])
        assert "BOINC-SE" in res.stdout, res.stdout
        assert_no_credentials((tmp_path / "agent.log").read_text(errors="replace"), dirac_server)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=20)
        gw.stop()
