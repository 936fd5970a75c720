"""The gateway as a BOINC project, spoken to as the stock client speaks (in process, both backends):
attach, work, download with Range, upload with get_file_size and resume, report and ack, validation and
assimilation through the native path, cancel and abort, lost-result resend, and every refusal."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from airlock.boinc.apps import sign_app, wrapper_path
from airlock.boinc.protocol import HostInfo, ReportedFile, ReportedResult, SchedulerRequest
from airlock.boinc.request import render_request
from airlock.boinc.signing import generate_key, private_pem
from airlock.core.states import JobState, TaskState
from airlock.credentials.accounts import boinc_passwd_hash
from airlock.db import schema
from airlock.db.engine import read, utcnow

from .helpers import PASSWORD, Api

EMAIL = "Ada@Example.org"


@pytest.fixture
def project(api: Api, tmp_path: Path) -> Api:
    """A gateway with the wrapper app signed by an offline key, and one input in the cache."""
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "key.pem").write_bytes(private_pem(generate_key()))
    sign_app(offline / "key.pem", api.gw.settings.data_dir, "airlock_wrapper", 100, [wrapper_path()])
    return api


class Client:
    """One simulated BOINC client: the scheduler requests and uploads the stock client makes."""

    def __init__(self, api: Api, name: str = "ada", email: str = EMAIL, ncpus: int = 1) -> None:
        self.api = api
        r = api.op("POST", "/api/v1/volunteers", json={"name": name, "password": PASSWORD, "email": email})
        assert r.status_code == 201, r.text
        self.volunteer_id = r.json()["id"]
        self.authenticator = lookup(api, email, PASSWORD)
        self.hostid = 0
        self.has_key = False
        self.ncpus = ncpus
        self.seqno = 0
        self.name = name

    def rpc(
        self,
        work: float = 3600.0,
        results: tuple[ReportedResult, ...] = (),
        others: tuple[str, ...] = (),
        authenticator: str | None = None,
    ) -> ET.Element:
        self.seqno += 1
        req = SchedulerRequest(
            authenticator=authenticator or self.authenticator,
            hostid=self.hostid,
            rpc_seqno=self.seqno,
            platform_name="x86_64-pc-linux-gnu",
            client_version=(7, 20, 5),
            work_req_seconds=work,
            host=HostInfo(
                host_cpid="c" * 32,
                domain_name=f"{self.name}-laptop",
                p_ncpus=self.ncpus,
                p_model="Test CPU",
                m_nbytes=8e9,
                d_free=5e10,
            ),
            results=results,
            other_results=others,
            has_code_sign_key=self.has_key,
        )
        r = self.api.client.post("/boinc/cgi", content=render_request(req))
        assert r.status_code == 200, r.text
        reply = ET.fromstring(r.content)
        assert reply.tag == "scheduler_reply"
        if reply.findtext("hostid"):
            self.hostid = int(reply.findtext("hostid") or 0)
        if reply.find("code_sign_key") is not None:
            self.has_key = True
        return reply

    def upload(self, name: str, data: bytes, offset: int = 0, md5: str | None = None) -> ET.Element:
        header = (
            "<data_server_request>\n<core_client_major_version>7</core_client_major_version>\n"
            f"<file_upload>\n<file_info>\n<name>{name}</name>\n<xml_signature>\n</xml_signature>\n"
            f"<max_nbytes>1000</max_nbytes>\n</file_info>\n<nbytes>{len(data)}</nbytes>\n"
            f"<md5_cksum>{md5 or hashlib.md5(data).hexdigest()}</md5_cksum>\n"
            f"<offset>{offset}</offset>\n<data>\n"
        ).encode()
        return self._upload_post(header + data[offset:])

    def upload_raw(self, header: bytes, data: bytes) -> ET.Element:
        return self._upload_post(header + data)

    def file_size(self, name: str) -> ET.Element:
        body = (
            "<data_server_request>\n<core_client_major_version>7</core_client_major_version>\n"
            f"<get_file_size>{name}</get_file_size>\n</data_server_request>\n"
        ).encode()
        return self._upload_post(body)

    def _upload_post(self, body: bytes) -> ET.Element:
        r = self.api.client.post("/boinc/file_upload_handler", content=body)
        assert r.status_code == 200, r.text
        return ET.fromstring(r.content)


def lookup(api: Api, email: str, password: str) -> str:
    r = api.client.get(
        "/boinc/lookup_account.php",
        params={"email_addr": email, "passwd_hash": boinc_passwd_hash(password, email)},
    )
    assert r.status_code == 200
    auth = ET.fromstring(r.content).findtext("authenticator")
    assert auth, r.text
    return auth


def done(name: str, data: dict[str, bytes], outputs: list[str], exit_status: int = 0) -> ReportedResult:
    return ReportedResult(
        name=name,
        state=5,
        exit_status=exit_status,
        final_cpu_time=1.5,
        final_elapsed_time=2.0,
        stderr_out="[airlock-wrapper] payload ended: exit code 0\n",
        files=tuple(ReportedFile(n, float(len(data[n])), hashlib.md5(data[n]).hexdigest()) for n in outputs),
    )


def job_spec(name: str, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "command": ["python3", "-c", "open('out.txt','w').write('42\\n')"],
        "outputs": [{"name": "out.txt", "max_size": 1000}],
        "deadline_s": 3600,
    }
    spec.update(kw)
    return spec


def results_of(reply: ET.Element) -> list[ET.Element]:
    return reply.findall("result")


def output_names(reply: ET.Element) -> list[str]:
    return [
        el.findtext("name") or ""
        for el in reply.findall("file_info")
        if el.find("upload_when_present") is not None
    ]


def acks(reply: ET.Element) -> list[str]:
    return [el.findtext("name") or "" for el in reply.findall("result_ack")]


def messages(reply: ET.Element) -> str:
    return " | ".join(el.text or "" for el in reply.findall("message"))


def task_row(api: Api, task_id: int) -> Any:
    with read(api.gw.engine) as conn:
        return conn.execute(select(schema.tasks).where(schema.tasks.c.id == task_id)).one()


def task_id_of(result_name: str) -> int:
    return int(result_name.rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------------- pages


def test_master_page_names_the_scheduler_in_the_line_the_client_parses(project: Api) -> None:
    r = project.client.get("/boinc/")
    assert r.status_code == 200
    assert '<link rel="boinc_scheduler" href="http://testserver/boinc/cgi">' in r.text.splitlines()


def test_project_config_and_lookup_account(project: Api) -> None:
    cfg = ET.fromstring(project.client.get("/boinc/get_project_config.php").content)
    assert cfg.findtext("master_url") == "http://testserver/boinc/"
    assert cfg.find("client_account_creation_disabled") is not None
    client = Client(project)
    assert len(client.authenticator) == 32
    # the e-mail address is matched case-insensitively, as BOINC lower-cases it in the hash
    assert lookup(project, EMAIL.lower(), PASSWORD) == client.authenticator
    bad = project.client.get(
        "/boinc/lookup_account.php",
        params={"email_addr": EMAIL, "passwd_hash": boinc_passwd_hash("wrong password", EMAIL)},
    )
    err = ET.fromstring(bad.content)
    assert err.tag == "error" and err.findtext("error_num") == "-136"


# ---------------------------------------------------------------------------------- the happy path


def test_a_boinc_client_takes_a_job_to_trusted_storage(project: Api) -> None:
    api = project
    r = api.op("POST", "/api/v1/inputs", content=b"input bytes\n" * 100)
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]
    batch = api.submit(job_spec("j1", inputs=[{"name": "data.txt", "sha256": sha}]))
    client = Client(api)
    reply = client.rpc()
    assert client.hostid > 0 and client.has_key, ET.tostring(reply)
    assert reply.findtext("userid") == str(client.volunteer_id)
    (host,) = api.op("GET", "/api/v1/hosts").json()
    assert (host["id"], host["name"], host["cores"]) == (client.hostid, "ada-laptop", 1)
    # app version: signed wrapper, served publicly
    app_file = next(el for el in reply.findall("file_info") if el.find("executable") is not None)
    assert app_file.findtext("file_signature")
    url = (app_file.findtext("url") or "").replace("http://testserver", "")
    assert api.client.get(url).content == wrapper_path().read_bytes()
    # the workunit's input: size and MD5 for the client to verify, and Range for resuming
    inp = next(
        el for el in reply.findall("file_info") if (el.findtext("name") or "").startswith("airlock_in_")
    )
    data = b"input bytes\n" * 100
    assert inp.findtext("md5_cksum") == hashlib.md5(data).hexdigest()
    assert float(inp.findtext("nbytes") or 0) == len(data)
    in_url = (inp.findtext("url") or "").replace("http://testserver", "")
    assert api.client.get(in_url).content == data
    part = api.client.get(in_url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == data[1000:]
    forged = in_url.rsplit("/", 2)[0] + "/" + "0" * 20 + "/" + sha
    assert api.client.get(forged).status_code == 404
    wu = reply.find("workunit")
    assert wu is not None and (wu.findtext("command_line") or "").startswith("--job ")
    (result,) = results_of(reply)
    name = result.findtext("name") or ""
    task = task_row(api, task_id_of(name))
    assert task.state == "leased" and task.host_id == client.hostid
    # the report deadline is the lease, and the lease is the deadline: BOINC clients do not heartbeat
    assert int(result.findtext("report_deadline") or 0) == int(task.lease_expires_at.timestamp())
    assert task.lease_expires_at == task.deadline
    (out_name,) = output_names(reply)
    out = next(el for el in reply.findall("file_info") if el.findtext("name") == out_name)
    assert float(out.findtext("max_nbytes") or 0) == 1000

    payload = b"42\n" * 10
    # resume: the first request carried 10 bytes, the client asks how many arrived and sends the rest
    first = client.upload_raw(_header(out_name, payload, 0), payload[:10])
    assert first.findtext("status") == "1"  # incomplete: try again
    assert client.file_size(out_name).findtext("file_size") == "10"
    # a resume that would change accepted bytes is refused, and the accepted bytes stay
    tampered = client.upload_raw(_header(out_name, payload, 5), b"XXXXX" + payload[10:])
    assert tampered.findtext("status") == "-1" and "never rewritten" in (tampered.findtext("message") or "")
    assert client.file_size(out_name).findtext("file_size") == "10"
    # an honest resume from an earlier offset re-sends equal bytes: accepted
    ok = client.upload(out_name, payload, offset=5)
    assert ok.findtext("status") == "0", ET.tostring(ok)
    assert client.file_size(out_name).findtext("file_size") == str(len(payload))
    assert client.upload(out_name, payload).findtext("status") == "0"  # a retried request: no change
    with read(api.gw.engine) as conn:
        f = conn.execute(select(schema.files).where(schema.files.c.kind == "output")).one()
    assert (f.volunteer_id, f.host_id, f.task_id, f.state) == (
        client.volunteer_id,
        client.hostid,
        task.id,
        "quarantined",
    )
    assert api.gw.quarantine.stat(f.location) is not None

    reply = client.rpc(work=0, results=(done(name, {"out.txt": payload}, ["out.txt"]),))
    assert acks(reply) == [name]
    assert task_row(api, task.id).state == "reported"
    api.settle()
    job = api.job(batch["jobs"][0])
    assert job["state"] == JobState.DONE.value, job
    r = api.op("GET", f"/api/v1/jobs/{job['id']}/outputs/out.txt")
    assert r.status_code == 200 and r.content == payload
    # re-reporting after the ack was lost: acknowledged again, nothing changes
    again = client.rpc(work=0, results=(done(name, {"out.txt": payload}, ["out.txt"]),))
    assert acks(again) == [name] and api.job(job["id"])["state"] == "done"


def _header(name: str, data: bytes, offset: int) -> bytes:
    return (
        f"<data_server_request><file_upload><file_info><name>{name}</name></file_info>"
        f"<nbytes>{len(data)}</nbytes><md5_cksum>{hashlib.md5(data).hexdigest()}</md5_cksum>"
        f"<offset>{offset}</offset><data>\n"
    ).encode()


def test_a_compute_error_is_reported_through_the_validator(project: Api) -> None:
    api = project
    batch = api.submit(job_spec("j1", max_attempts=2))
    client = Client(api)
    (result,) = results_of(client.rpc())
    name = result.findtext("name") or ""
    failed = replace(done(name, {}, []), state=3, exit_status=2, stderr_out="Traceback: boom\n")
    assert acks(client.rpc(work=0, results=(failed,))) == [name]
    task = task_row(api, task_id_of(name))
    assert task.exit_code == 2 and "boom" in task.stderr_tail and "compute error" in task.stderr_tail
    api.settle()
    assert task_row(api, task.id).state == TaskState.ERROR.value
    assert api.job(batch["jobs"][0])["state"] in ("queued", "running")  # reissued


# ------------------------------------------------------------------------------------ refusals


def test_unknown_authenticator_and_malformed_requests_change_nothing(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"))
    client = Client(api)
    before = api.snapshot()
    reply = client.rpc(authenticator="f" * 32)
    assert "Unknown account key" in messages(reply) and not results_of(reply)
    assert reply.find("hostid") is None and reply.find("code_sign_key") is None
    for body in (
        b"<scheduler_request>",
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>",
        b"junk",
    ):
        r = api.client.post("/boinc/cgi", content=body)
        assert r.status_code == 200
        reply = ET.fromstring(r.content)
        assert "Scheduler request refused" in messages(reply) and not results_of(reply)
    assert api.snapshot() == before


def test_forged_and_foreign_results_are_refused_and_change_nothing(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"), job_spec("j2"))
    ada, bob = Client(api), Client(api, "bob", "bob@example.org")
    (mine,) = results_of(ada.rpc())
    name = mine.findtext("name") or ""
    bob.rpc(work=0)
    before = api.snapshot()
    # bob reports ada's result, and a name that is no result of ours
    reply = bob.rpc(work=0, results=(done(name, {}, []), done("airlock_1_99999", {}, [])))
    assert "was not sent to this host" in messages(reply) and "not a result of this project" in messages(
        reply
    )
    assert task_row(api, task_id_of(name)).state == "leased"
    # uploads: a made-up name, a real name with a forged tag
    assert ada.upload("airlock_1_1_0_" + "0" * 20, b"x").findtext("status") == "-1"
    assert ada.upload("../../etc/passwd", b"x").findtext("status") == "-1"
    assert ada.file_size("airlock_1_1_0_" + "a" * 20).findtext("status") == "-1"
    api.client.post("/boinc/file_upload_handler", content=b"<data_server_request><!DOCTYPE")
    assert api.snapshot() == before


def test_upload_limits_and_checksum(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"))
    client = Client(api)
    reply = client.rpc()
    (out_name,) = output_names(reply)
    too_big = client.upload(out_name, b"x" * 1001)
    assert too_big.findtext("status") == "-1" and "at most 1000" in (too_big.findtext("message") or "")
    bad_md5 = client.upload(out_name, b"hello", md5="0" * 32)
    assert bad_md5.findtext("status") == "-1" and "MD5" in (bad_md5.findtext("message") or "")
    more = client.upload_raw(_header(out_name, b"abc", 0), b"abcdef")
    assert more.findtext("status") == "-1"
    with read(api.gw.engine) as conn:
        assert conn.execute(select(schema.files).where(schema.files.c.kind == "output")).all() == []


def test_blocked_volunteer_gets_a_message_no_work_and_aborts(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"), job_spec("j2"))
    client = Client(api, ncpus=1)
    (result,) = results_of(client.rpc())
    name = result.findtext("name") or ""
    r = api.op("POST", f"/api/v1/volunteers/{client.volunteer_id}/block")
    assert r.status_code == 200, r.text
    reply = client.rpc(others=(name,))
    assert "blocked" in messages(reply) and not results_of(reply)
    assert [el.findtext("name") for el in reply.findall("result_abort")] == [name]


def test_blocked_volunteer_cannot_upload(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"))
    client = Client(api)
    (out_name,) = output_names(client.rpc())
    api.op("POST", f"/api/v1/volunteers/{client.volunteer_id}/block")
    refused = client.upload(out_name, b"42\n")
    assert refused.findtext("status") == "-1"


def test_quota_and_no_app_version_are_explained(api: Api) -> None:
    api.submit(job_spec("j1"))
    client = Client(api)
    reply = client.rpc()
    assert "No signed version of airlock_wrapper" in messages(reply) and not results_of(reply)


# ----------------------------------------------------------------------------- abort and resend


def test_cancelled_job_is_aborted_and_acked_only_after_the_delay(project: Api) -> None:
    api = project
    batch = api.submit(job_spec("j1"))
    client = Client(api)
    (result,) = results_of(client.rpc())
    name = result.findtext("name") or ""
    task_id = task_id_of(name)
    assert api.op("POST", f"/api/v1/jobs/{batch['jobs'][0]}/cancel").status_code == 200
    reply = client.rpc(work=0, others=(name,))
    assert [el.findtext("name") for el in reply.findall("result_abort")] == [name]
    sent = task_row(api, task_id).abort_sent_at
    assert sent is not None
    aborted = replace(done(name, {}, []), state=6, exit_status=202)
    early = client.rpc(work=0, results=(aborted,))
    assert acks(early) == []  # the client may not have killed the app yet
    with api.gw.engine.begin() as conn:
        conn.execute(
            update(schema.tasks)
            .where(schema.tasks.c.id == task_id)
            .values(abort_sent_at=utcnow() - timedelta(seconds=api.gw.settings.boinc_abort_ack_delay_s + 1))
        )
    late = client.rpc(work=0, results=(aborted,))
    assert acks(late) == [name]
    assert task_row(api, task_id).state == TaskState.ABORTED.value


def test_lost_results_are_resent_and_unknown_ones_aborted(project: Api) -> None:
    api = project
    api.submit(job_spec("j1"))
    client = Client(api)
    (result,) = results_of(client.rpc())
    name = result.findtext("name") or ""
    # the client lost the reply: it neither holds nor reports the result
    reply = client.rpc(work=0)
    assert [r.findtext("name") for r in results_of(reply)] == [name]
    assert "resent lost task" in messages(reply)
    assert output_names(reply) == output_names(reply)[:1]
    # holding it now: nothing more is sent; holding a result we never gave it: abort that one
    reply = client.rpc(work=3600, others=(name, "airlock_9_9"))
    assert results_of(reply) == []
    assert [el.findtext("name") for el in reply.findall("result_abort")] == ["airlock_9_9"]


def test_one_task_per_core_and_per_host_quota(project: Api) -> None:
    api = project
    api.submit(*(job_spec(f"j{i}") for i in range(6)))
    client = Client(api, ncpus=2)
    first = results_of(client.rpc())
    assert len(first) == 2
    names = tuple(r.findtext("name") or "" for r in first)
    assert results_of(client.rpc(others=names)) == []  # both cores busy
    other = Client(api, "bob", "bob@example.org", ncpus=4)
    other.rpc(work=0)
    with api.gw.engine.begin() as conn:
        conn.execute(update(schema.hosts).where(schema.hosts.c.id == other.hostid).values(daily_quota=1))
    taken = [r.findtext("name") or "" for r in results_of(other.rpc())]
    assert len(taken) == 4  # a day's quota is per core: 1 x 4
    failed = tuple(replace(done(n, {}, []), state=3, exit_status=1) for n in taken)
    reply = other.rpc(results=failed)
    assert acks(reply) == taken and results_of(reply) == []
    assert "daily quota" in messages(reply)


def test_stale_partial_uploads_are_swept_once_their_task_is_over(project: Api) -> None:
    import os

    from airlock.boinc.upload import sweep_staging

    api = project
    batch = api.submit(job_spec("j1"), job_spec("j2"))
    client = Client(api, ncpus=2)
    reply = client.rpc()
    names = output_names(reply)
    assert len(names) == 2
    for name in names:  # two interrupted uploads
        assert client.upload_raw(_header(name, b"0123456789", 0), b"01234").findtext("status") == "1"
    staging = api.gw.settings.data_dir / "boinc" / "uploads"
    parts = sorted(staging.glob("*.part"))
    assert len(parts) == 2
    assert sweep_staging(api.gw.engine, staging, 3600) == 0  # recent: kept
    for p in parts:
        os.utime(p, (1, 1))
    assert sweep_staging(api.gw.engine, staging, 3600) == 0  # old, but both tasks still leased
    first_job = batch["jobs"][0]
    api.op("POST", f"/api/v1/jobs/{first_job}/cancel")
    assert sweep_staging(api.gw.engine, staging, 3600) == 1
    (left,) = staging.glob("*.part")
    assert f"airlock_{first_job}_" not in left.name
