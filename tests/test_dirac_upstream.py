"""End to end against a real, local DIRAC 9.1.22: the gateway's DIRAC operations through the worker.

alice submits jobs with DIRAC's own command line tools; the gateway (its own host identity, GenericPilot)
matches them, downloads their sandboxes, reports status, heartbeats, uploads the output sandbox as alice
and registers output files; alice sees all of it with DIRAC's tools.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from airlock.upstream.dirac_client import DiracClient, DiracError, DiracTimeout, MatchedJob

if TYPE_CHECKING:  # the fixtures come from tests/dirac_fixture.py, a plugin of tests/conftest.py
    from .dirac_fixture import DiracServer


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def submit_jdl(server: DiracServer, workdir: Path, body: str) -> int:
    """alice submits the JDL ``[ body ]`` with an input sandbox of run.sh (and in.txt)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "in.txt").write_text("input\n")
    (workdir / "run.sh").write_text('#!/bin/sh\necho "$1"\n')
    (workdir / "job.jdl").write_text("[\n  " + body + "]\n")
    res = server.run(["dirac-wms-job-submit", "job.jdl"], cwd=workdir)
    m = re.search(r"JobID\s*=\s*(\d+)", res.stdout)
    assert m, f"no JobID in dirac-wms-job-submit output:\n{res.stdout}\n{res.stderr}"
    return int(m.group(1))


def submit(server: DiracServer, workdir: Path, name: str, *, arguments: str = "run.sh 42") -> int:
    """alice submits a JDL job with an input sandbox (in.txt, run.sh) using dirac-wms-job-submit."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "in.txt").write_text(f"input of {name}\n")
    (workdir / "run.sh").write_text('#!/bin/sh\necho "$1" > result.txt\n')
    (workdir / "job.jdl").write_text(
        "[\n"
        f'  JobName = "{name}";\n'
        '  Executable = "/bin/sh";\n'
        f'  Arguments = "{arguments}";\n'
        '  InputSandbox = {"in.txt", "run.sh"};\n'
        '  OutputSandbox = {"result.txt", "std.out"};\n'
        '  OutputData = {"result.txt"};\n'
        '  OutputSE = "BOINC-SE";\n'
        '  OutputPath = "/airlock/out";\n'
        "  CPUTime = 7200;\n"
        "]\n"
    )
    res = server.run(["dirac-wms-job-submit", "job.jdl"], cwd=workdir)
    m = re.search(r"JobID\s*=\s*(\d+)", res.stdout)
    assert m, f"no JobID in dirac-wms-job-submit output:\n{res.stdout}\n{res.stderr}"
    return int(m.group(1))


def match_own(client: DiracClient, job_id: int) -> MatchedJob:
    job = client.match()
    assert job is not None, f"the Matcher found no job (expected {job_id})"
    assert job.job_id == job_id
    return job


def test_ping_answers_before_dirac_is_loaded(dirac_server: DiracServer) -> None:
    with dirac_server.client(log_name="worker-ping.log") as client:
        t0 = time.monotonic()
        pong = client.ping()
        assert pong["pong"] is True
        assert pong["dirac_loaded"] is False
        assert time.monotonic() - t0 < 10


def test_match_gives_the_job_once_with_its_jdl_and_sandbox(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    job_id = submit(dirac_server, tmp_path / "job", "airlock-match")
    dirac_server.wait_status(job_id, "Waiting")

    job = match_own(dirac_client, job_id)
    assert dirac_client.match() is None, "a second match must find nothing"
    assert dirac_server.status(job_id)["Status"] == "Matched"

    assert job.owner == "alice"
    assert job.owner_group == "dirac_user"
    assert job.vo == "airlock"
    assert job.owner_dn == "/O=Airlock/OU=Users/CN=alice"
    assert job.executable == "/bin/sh"
    assert job.arguments == "run.sh 42"
    assert job.cpu_time == 7200
    assert job.job_name == "airlock-match"
    assert set(job.output_sandbox) == {"result.txt", "std.out"}
    assert job.output_data == ("result.txt",)
    assert job.output_se == ("BOINC-SE",)
    assert job.output_path == "/airlock/out"
    assert job.input_data == ()
    assert "JobID = " in job.jdl or "JobID=" in job.jdl.replace(" ", "")
    assert len(job.input_sandbox_pfns) == 1
    assert job.input_sandbox_pfns[0].startswith("SB:ProductionSandboxSE|")

    dest = tmp_path / "sandbox"
    names = dirac_client.download_sandbox(job.input_sandbox_pfns[0], dest)
    assert set(names) == {"in.txt", "run.sh"}
    assert (dest / "in.txt").read_text() == "input of airlock-match\n"
    assert (dest / "run.sh").read_text().startswith("#!/bin/sh")

    dirac_client.set_status(job_id, "Failed", "Airlock test: not run")  # leave nothing matchable behind
    assert dirac_server.status(job_id)["Status"] == "Failed"


def test_match_passes_requirements_and_redirections_parsed_by_dirac(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    """NumberOfProcessors, Tags/Tag, StdOutput, StdError (and Platform) come parsed from the JDL, with the
    tags DIRAC's optimizers add; nothing needs a second look at the raw JDL text."""
    job_id = submit_jdl(
        dirac_server,
        tmp_path / "job",
        'JobName = "airlock-reqs";\n  Executable = "/bin/sh";\n  Arguments = "run.sh 1";\n'
        '  InputSandbox = {"run.sh"};\n  OutputSandbox = {"o.log", "e.log"};\n'
        '  StdOutput = "o.log";\n  StdError = "e.log";\n  NumberOfProcessors = 2;\n'
        '  Tags = {"GPU", "SSD"};\n  CPUTime = 600;\n',
    )
    dirac_server.wait_status(job_id, "Waiting")
    # a resource offering what the job asks for (the gateway's default resource does not)
    job = dirac_client.match(
        {"Tag": ["GPU", "SSD", "2Processors", "MultiProcessor"], "NumberOfProcessors": 4}
    )
    assert job is not None and job.job_id == job_id
    assert job.number_of_processors == 2 and job.max_number_of_processors is None
    assert {"GPU", "SSD"} <= set(job.tags) <= {"GPU", "SSD", "2Processors", "MultiProcessor"}
    assert (job.std_output, job.std_error, job.platform) == ("o.log", "e.log", None)
    dirac_client.set_status(job_id, "Failed", "Airlock test: not run")

    # Platform needs OS compatibility data this DIRAC lacks to be submitted: parse a JDL holding it
    fields = dirac_client.parse_jdl(
        '[ Executable = "/bin/sh"; Platform = "x86_64-el9"; Tag = "SSD"; MaxNumberOfProcessors = 4;'
        ' NumberOfProcessors = "many"; CPUTime = 100; ]'
    )
    assert fields["Platform"] == "x86_64-el9" and fields["Tag"] == ["SSD"]
    assert fields["MaxNumberOfProcessors"] == 4 and fields["NumberOfProcessors"] == "many"
    assert fields["CPUTime"] == 100 and fields["Tags"] == []


def test_input_sizes_before_download(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    """The size of a job's input sandbox (its packed archive) and of an LFN, with nothing downloaded."""
    job_id = submit(dirac_server, tmp_path / "job", "airlock-sizes")
    dirac_server.wait_status(job_id, "Waiting")
    job = match_own(dirac_client, job_id)
    (pfn,) = job.input_sandbox_pfns
    lfn = f"/airlock/user/a/alice/airlock-test/{int(time.time() * 1000)}/input.dat"
    src = tmp_path / "input.dat"
    src.write_bytes(b"0123456789" * 1234)
    dirac_client.put_and_register(lfn, src, dirac_server.se)
    missing = "/airlock/no/such/input.dat"

    found = dirac_client.input_sizes([pfn], [lfn, missing])
    packed = found.sizes[pfn]
    assert packed is not None and 100 < packed < 10_000  # a small tar.bz2 of in.txt + run.sh
    assert found.how[pfn] in ("SandboxMetadataDB", "StorageElement")
    assert found.sizes[lfn] == 12340 and found.how[lfn] == "FileCatalog"
    assert found.sizes[missing] is None and missing in found.errors
    assert found.known_total == packed + 12340 and found.unknown == (missing,)
    dirac_client.set_status(job_id, "Failed", "Airlock test: not run")


def test_long_status_texts_are_cut_to_dirac_s_columns(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    """MinorStatus is VARCHAR(128), ApplicationStatus VARCHAR(255): longer texts would make MySQL refuse
    the update (error 1406); the worker cuts them (first N-3 characters and "...")."""
    job_id = submit(dirac_server, tmp_path / "job", "airlock-long")
    dirac_server.wait_status(job_id, "Waiting")
    match_own(dirac_client, job_id)
    minor, app = "Airlock: " + "m" * 300, "a" * 400
    # straight to the worker too: no caller can get past the rule
    raw = dirac_client.call(
        "set_status", {"job_id": job_id, "status": "Running", "minor": minor, "application": app}
    )
    assert raw["MinorStatus"] == minor[:125] + "..." and raw["ApplicationStatus"] == app[:252] + "..."
    st = dirac_client.set_status(job_id, "Failed", "Airlock: " + "r" * 200, application="b" * 256)
    assert st.minor_status == ("Airlock: " + "r" * 200)[:125] + "..." and len(st.minor_status or "") == 128
    assert st.application_status == "b" * 252 + "..."
    seen = dirac_server.status(job_id)
    assert seen["Status"] == "Failed" and seen["MinorStatus"] == st.minor_status


def test_statuses_heartbeat_and_output_sandbox_seen_by_alice(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    job_id = submit(dirac_server, tmp_path / "job", "airlock-run")
    dirac_server.wait_status(job_id, "Waiting")
    match_own(dirac_client, job_id)

    st = dirac_client.set_status(job_id, "Running", "Application", application="volunteer task started")
    assert st.status == "Running"
    seen = dirac_server.status(job_id)
    assert (seen["Status"], seen["MinorStatus"]) == ("Running", "Application")
    assert seen["ApplicationStatus"] == "volunteer task started"

    assert dirac_client.heartbeat(job_id, {"CPUConsumed": 12.5, "LoadAverage": 0.5}) == {}
    dirac_client.set_parameters(job_id, {"AirlockTask": "task-1", "AirlockHost": 7})

    dirac_client.set_status(job_id, "Completing", "Uploading Output Sandbox")
    assert dirac_server.status(job_id)["Status"] == "Completing"

    assert dirac_client.output_sandboxes(job_id, owner_proxy=dirac_server.alice_proxy) == []
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("42\n")
    (out / "std.out").write_text("ran on a volunteer\n")
    pfn = dirac_client.upload_output_sandbox(
        job_id, [out / "result.txt", out / "std.out"], owner_proxy=dirac_server.alice_proxy
    )
    assert pfn.startswith("SB:ProductionSandboxSE|")
    assert "alice" in pfn  # stored under the owner's name: uploaded with alice's proxy
    # the job's Output sandboxes, as alice sees them (and the gateway, a JobAdministrator)
    assert dirac_client.output_sandboxes(job_id, owner_proxy=dirac_server.alice_proxy) == [pfn]
    assert dirac_client.output_sandboxes(job_id) == [pfn]

    st = dirac_client.set_status(job_id, "Done", "Execution Complete", application="exit 0")
    assert (st.status, st.minor_status, st.application_status) == ("Done", "Execution Complete", "exit 0")
    seen = dirac_server.status(job_id)
    assert (seen["Status"], seen["MinorStatus"]) == ("Done", "Execution Complete")

    fetch = tmp_path / "alice"
    fetch.mkdir()
    dirac_server.run(["dirac-wms-job-get-output", str(job_id)], cwd=fetch)
    assert (fetch / str(job_id) / "result.txt").read_text() == "42\n"
    assert (fetch / str(job_id) / "std.out").read_text() == "ran on a volunteer\n"


def test_heartbeat_returns_kill_after_alice_kills_the_job(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    job_id = submit(dirac_server, tmp_path / "job", "airlock-kill")
    dirac_server.wait_status(job_id, "Waiting")
    match_own(dirac_client, job_id)
    dirac_client.set_status(job_id, "Running", "Application")
    assert dirac_client.heartbeat(job_id, {"CPUConsumed": 1.0}) == {}

    res = dirac_server.run(["dirac-wms-job-kill", str(job_id)])
    assert "Killed" in res.stdout or "killed" in res.stdout.lower(), res.stdout

    commands = dirac_client.heartbeat(job_id, {"CPUConsumed": 2.0})
    assert commands == {"Kill": ""}
    # the command is delivered once
    assert dirac_client.heartbeat(job_id, {"CPUConsumed": 3.0}) == {}


def test_reschedule_returns_the_job_to_waiting(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    job_id = submit(dirac_server, tmp_path / "job", "airlock-resched")
    dirac_server.wait_status(job_id, "Waiting")
    match_own(dirac_client, job_id)
    dirac_client.set_status(job_id, "Running", "Application")
    assert dirac_client.match() is None

    dirac_client.reschedule(job_id)
    dirac_server.wait_status(job_id, "Waiting", timeout=60)

    again = match_own(dirac_client, job_id)  # matchable again, by the gateway
    assert again.owner == "alice"
    dirac_client.set_status(job_id, "Failed", "Airlock test: not run")


def test_put_and_register_then_replicas_and_get_file(
    dirac_server: DiracServer, dirac_client: DiracClient, tmp_path: Path
) -> None:
    lfn = f"/airlock/user/a/alice/airlock-test/{int(time.time() * 1000)}/output.dat"
    src = tmp_path / "output.dat"
    src.write_bytes(b"volunteer output\n" * 100)

    dirac_client.put_and_register(lfn, src, dirac_server.se)
    replicas = dirac_client.get_replicas(lfn)
    assert list(replicas) == ["BOINC-SE"]

    res = dirac_server.run(["dirac-dms-lfn-replicas", lfn])
    assert "BOINC-SE" in res.stdout and lfn in res.stdout, res.stdout

    path = dirac_client.get_file(lfn, tmp_path / "back")
    assert path.read_bytes() == src.read_bytes()

    # alice can register an output too (her proxy for that call only)
    lfn2 = lfn.replace("output.dat", "by-alice.dat")
    dirac_client.put_and_register(lfn2, src, dirac_server.se, owner_proxy=dirac_server.alice_proxy)
    assert "BOINC-SE" in dirac_client.get_replicas(lfn2)


def test_gateway_can_run_with_a_proxy_of_its_certificate(dirac_server: DiracServer, tmp_path: Path) -> None:
    """The worker also runs with a proxy of the gateway certificate (group airlock_pilot, GenericPilot)."""
    env = dict(dirac_server.env, AIRLOCK_DIRAC_GATEWAY_PROXY=str(dirac_server.info["gateway_proxy"]))
    log = dirac_server.root / "logs" / "worker-proxy.log"
    with DiracClient(dirac_server.python, env, timeout=120, stderr=str(log)) as client:
        job_id = submit(dirac_server, tmp_path / "job", "airlock-proxy")
        dirac_server.wait_status(job_id, "Waiting")
        match_own(client, job_id)
        assert client.set_status(job_id, "Running", "Application").status == "Running"
        assert client.heartbeat(job_id, {"CPUConsumed": 1.0}) == {}
        client.reschedule(job_id)
        dirac_server.wait_status(job_id, "Waiting", timeout=60)
        match_own(client, job_id)
        client.set_status(job_id, "Failed", "Airlock test: not run")
    assert dirac_server.status(job_id)["Status"] == "Failed"


def test_bad_input_gives_a_clear_dirac_error(dirac_server: DiracServer, dirac_client: DiracClient) -> None:
    unknown = 987654
    with pytest.raises(DiracError, match=f"{unknown}.*not found|not found.*{unknown}"):
        dirac_client.heartbeat(unknown, {"CPUConsumed": 1.0})
    with pytest.raises(DiracError, match="not found"):
        dirac_client.set_status(unknown, "Running", "Application")
    with pytest.raises(DiracError, match="not found"):
        dirac_client.reschedule(unknown)
    with pytest.raises(DiracError, match="SB:"):
        dirac_client.download_sandbox("/not/a/sandbox", "/tmp")
    with pytest.raises(DiracError, match="owner proxy file not found"):
        dirac_client.upload_output_sandbox(1, [__file__], owner_proxy="/nonexistent/proxy.pem")
    with pytest.raises(DiracError, match="getReplicas"):
        dirac_client.get_replicas("/airlock/no/such/file")
    with pytest.raises(DiracError, match="unknown op"):
        dirac_client.call("no_such_op")
    # the worker survives errors
    assert dirac_client.ping()["pong"] is True


FAKE_WORKER = """
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "sleep":
        time.sleep(req["args"]["s"])
    if req["op"] == "exit":
        os._exit(3)
    print("noise that is not a reply", flush=True)
    print(json.dumps({"id": req["id"], "ok": True, "result": {"pid": os.getpid()}}), flush=True)
"""


def test_client_timeout_restarts_the_worker_and_reports_its_death(tmp_path: Path) -> None:
    """The client's own mechanics, with a stand-in worker (no DIRAC needed)."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    with DiracClient(sys.executable, {}, timeout=30, worker=worker) as client:
        first = client.call("ping")["pid"]
        with pytest.raises(DiracTimeout, match="no answer within 1s"):
            client.call("sleep", {"s": 30}, timeout=1)
        second = client.call("ping")["pid"]
        assert second != first, "a timed-out worker is replaced by a fresh one"
        with pytest.raises(DiracError, match="worker exited"):
            client.call("exit")
        assert client.call("ping")["pid"] not in (first, second)
    with pytest.raises(DiracError, match="closed"):
        client.call("ping")
