"""The gateway with `bridge = "xrootd"`: volunteers upload straight to a real XRootD server with their
per-task token, the validator checks the server's checksums and the bytes, the assimilator copies to the
trusted area with the gateway's own token, exactly once even when killed at any point."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from airlock.api.app import create_app
from airlock.assimilator.assimilate import assimilate_pending
from airlock.assimilator.janitor import sweep_quarantine
from airlock.config import Settings, load_settings
from airlock.context import Gateway, initialise
from airlock.core.checksums import digest_bytes
from airlock.credentials.keys import load_signing_keys
from airlock.credentials.tokens import TokenIssuer
from airlock.db import schema
from airlock.db.engine import read
from airlock.db.migrate import upgrade
from airlock.storage.xrootd import XRootDStorage
from airlock.storage.xrootd_server import XRootDServer, free_port
from airlock.validator.validate import validate_pending

from .helpers import OPERATOR_TOKEN, Api, Volunteer, job
from .test_xrootd import start_xrootd
from .xrootd_watchdog import watched

ISSUER = "https://airlock.test"
CRASH_POINTS = ["assimilate.after_copy", "assimilate.before_commit", "assimilate.after_commit"]


class XApi(Api):
    server: XRootDServer


@pytest.fixture
def xapi(tmp_path: Path) -> Iterator[XApi]:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": f"sqlite:///{tmp_path / 'airlock.db'}",
        "operator_token": OPERATOR_TOKEN,
        "public_url": "http://testserver",
        "issuer": ISSUER,
        "background": False,
    }
    initialise(load_settings(**base))
    issuer = TokenIssuer(ISSUER, load_signing_keys(tmp_path / "data" / "keys"))
    port = free_port()
    storage_url = f"https://localhost:{port}"
    # the server must accept the volunteers' tokens (audience: the issuer) and the gateway's own
    srv = XRootDServer(issuer.issuer, issuer.jwks(), [issuer.audience, storage_url], port=port)
    server = start_xrootd(srv)
    settings = load_settings(
        **base, bridge="xrootd", storage_url=storage_url, storage_ca_file=server.pki.ca_file
    )
    gw = Gateway.open(settings)
    upgrade(gw.engine)
    try:
        with watched(server), TestClient(create_app(gw, background=False)) as client:
            api = XApi(client, gw)
            api.server = server
            yield api
    finally:
        gw.close()
        server.stop()


def direct_upload(api: XApi, task: dict[str, Any], data: bytes, name: str) -> httpx.Response:
    url = next(o["upload_url"] for o in task["outputs"] if o["name"] == name)
    ctx = ssl.create_default_context(cafile=api.server.pki.ca_file)
    with httpx.Client(verify=ctx, timeout=10) as client:
        return client.put(url, content=data, headers={"Authorization": f"Bearer {task['upload_token']}"})


def run_task(
    api: XApi, v: Volunteer, outputs: dict[str, bytes], reported: dict[str, bytes] | None = None
) -> int:
    (t,) = v.work()
    for name, data in outputs.items():
        assert direct_upload(api, t, data, name).status_code in (200, 201)
    assert v.report(t, 0, reported or outputs).status_code == 200
    return int(t["task_id"])


def validate(api: XApi, passes: int = 5) -> None:
    """Validator passes until no task waits for a verdict. A task whose files the storage failed to
    serve is left for the next pass (seen once here under load: a GET answered 404 just after a checksum
    query found the file); the tests need its verdict, not the first pass's luck."""
    for _ in range(passes):
        validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings)
        if api.count(schema.tasks, schema.tasks.c.state == "reported") == 0:
            return
        time.sleep(0.5)


def task_state(api: XApi, task_id: int) -> Any:
    with read(api.gw.engine) as conn:
        return conn.execute(select(schema.tasks).where(schema.tasks.c.id == task_id)).one()


def test_dispatch_sends_volunteers_to_the_storage_with_only_their_create_token(xapi: XApi) -> None:
    xapi.submit(job("a", outputs=[{"name": "out.txt", "max_size": 100}]))
    v = xapi.volunteer()
    (t,) = v.work()
    assert t["outputs"][0]["upload_url"] == f"{xapi.server.url}/quarantine/{v.id}/{t['task_id']}/out.txt"
    claims = jwt.decode(t["upload_token"], options={"verify_signature": False})
    assert claims["scope"] == f"storage.create:/quarantine/{v.id}/{t['task_id']}"
    assert claims["aud"] == ISSUER and claims["sub"] == str(v.id)
    # the gateway's own storage token is a trusted credential: nowhere in what the volunteer gets
    assert isinstance(xapi.gw.quarantine, XRootDStorage)
    assert xapi.gw.quarantine._token() not in repr(t)
    assert "storage.read" not in repr(t) and "storage.modify" not in repr(t)


def test_outputs_go_straight_to_xrootd_are_validated_and_assimilated(xapi: XApi) -> None:
    (jid,) = xapi.submit(job("a", outputs=[{"name": "out.txt", "max_size": 100}]))["jobs"]
    v = xapi.volunteer()
    tid = run_task(xapi, v, {"out.txt": b"the result\n"})
    with read(xapi.gw.engine) as conn:  # the gateway saw no byte of it
        assert conn.execute(select(schema.files).where(schema.files.c.kind == "output")).all() == []
    xapi.settle()
    assert task_state(xapi, tid).state == "valid"
    assert xapi.job(jid)["state"] == "done"
    with read(xapi.gw.engine) as conn:
        rows = conn.execute(select(schema.files).order_by(schema.files.c.id)).all()
    want = digest_bytes(b"the result\n")
    out, trusted = rows
    assert (out.kind, out.state, out.volunteer_id, out.host_id) == ("output", "deleted", v.id, v.host_id)
    assert (trusted.kind, trusted.size, trusted.adler32, trusted.sha256) == (
        "trusted",
        want.size,
        want.adler32,
        want.sha256,
    )
    store = xapi.gw.trusted
    assert store.stat(trusted.location) == want
    assert not store.exists(out.location)  # the quarantined copy is gone
    r = xapi.op("GET", f"/api/v1/jobs/{jid}/outputs/out.txt")  # relayed from trusted storage
    assert r.status_code == 200 and r.content == b"the result\n"
    assert r.headers["digest"] == f"adler32={want.adler32}"


def test_lying_or_oversized_direct_uploads_are_invalid(xapi: XApi) -> None:
    xapi.submit(
        job("a", outputs=[{"name": "out.txt", "max_size": 10}]),
        job("b", outputs=[{"name": "out.txt", "max_size": 10}]),
    )
    v = xapi.volunteer()
    (t,) = v.work()
    assert direct_upload(xapi, t, b"bytes 1\n", "out.txt").status_code in (200, 201)
    extra = t["outputs"][0]["upload_url"].replace("out.txt", "extra.bin")
    ctx = ssl.create_default_context(cafile=xapi.server.pki.ca_file)
    r = httpx.put(
        extra, content=b"junk", headers={"Authorization": f"Bearer {t['upload_token']}"}, verify=ctx
    )
    assert r.status_code in (200, 201)  # the storage cannot restrict names under the task's path
    assert v.report(t, 0, {"out.txt": b"other 1\n"}).status_code == 200
    lied = int(t["task_id"])
    big = run_task(xapi, v, {"out.txt": b"x" * 1000})
    validate(xapi)
    assert task_state(xapi, lied).state == "invalid"
    assert "checksums differ" in task_state(xapi, lied).verdict
    assert task_state(xapi, big).state == "invalid"
    assert "more than the declared" in task_state(xapi, big).verdict
    # the undeclared file was removed, on record
    assert not xapi.gw.quarantine.exists(f"quarantine/{v.id}/{lied}/extra.bin")
    with read(xapi.gw.engine) as conn:
        removed = conn.execute(
            select(schema.events).where(schema.events.c.action == "file.undeclared_removed")
        ).all()
    assert [(e.object_id, e.detail["key"]) for e in removed] == [
        (lied, f"quarantine/{v.id}/{lied}/extra.bin")
    ]
    with read(xapi.gw.engine) as conn:  # both uploads are on record, attributed, never trusted
        rows = conn.execute(select(schema.files)).all()
    assert sorted((r.task_id, r.kind, r.volunteer_id) for r in rows) == [
        (lied, "output", v.id),
        (big, "output", v.id),
    ]


def _worker_once(settings: Settings, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    env.update(
        AIRLOCK_BRIDGE="xrootd",
        AIRLOCK_STORAGE_URL=str(settings.storage_url),
        AIRLOCK_STORAGE_CA_FILE=str(settings.storage_ca_file),
        AIRLOCK_ISSUER=ISSUER,
    )
    if crash_at:
        env["AIRLOCK_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "airlock", "worker", "--once", "--data-dir", str(settings.data_dir)]
    cmd += ["--database-url", settings.db_url]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_assimilator_killed_at_any_point_copies_to_xrootd_once(xapi: XApi, crash_at: str) -> None:
    (jid,) = xapi.submit(
        job("a", outputs=[{"name": "out.txt", "max_size": 100}, {"name": "log.txt", "max_size": 100}])
    )["jobs"]
    v = xapi.volunteer()
    run_task(xapi, v, {"out.txt": b"the result\n", "log.txt": b"the log\n"})
    validate(xapi)
    assert xapi.job(jid)["state"] == "assimilating"

    crashed = _worker_once(xapi.gw.settings, crash_at)
    assert crashed.returncode == 86, crashed.stderr
    again = _worker_once(xapi.gw.settings, None)
    assert again.returncode == 0, again.stderr

    assert xapi.job(jid)["state"] == "done"
    with read(xapi.gw.engine) as conn:
        trusted = conn.execute(select(schema.files).where(schema.files.c.kind == "trusted")).all()
    assert sorted(r.name for r in trusted) == ["log.txt", "out.txt"]
    store = xapi.gw.trusted
    assert sorted(store.list("trusted")) == sorted(r.location for r in trusted)  # no duplicate, no temporary
    assert store.stat(next(r.location for r in trusted if r.name == "out.txt")) == digest_bytes(
        b"the result\n"
    )
    # a crash after the commit leaves the quarantined copies to the janitor, which removes them remotely too
    sweep_quarantine(
        xapi.gw.engine, xapi.gw.quarantine, xapi.gw.settings.model_copy(update={"quarantine_retention_s": 0})
    )
    assert list(store.list("quarantine")) == []


def test_settings_for_the_xrootd_bridge() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs storage_url"):
        load_settings(bridge="xrootd")
    with pytest.raises(ValidationError, match="needs storage_url"):
        load_settings(bridge="xrootd", storage_url="http://plain.example:1094")
    s = load_settings(
        bridge="xrootd", storage_url="https://xrd.example:1094/airlock/", public_url="http://gw"
    )
    assert s.upload_base_url == "https://xrd.example:1094/airlock"
    assert load_settings(public_url="http://gw/").upload_base_url == "http://gw"


@pytest.mark.slow
def test_demo_on_the_xrootd_bridge(tmp_path: Path) -> None:
    """`airlock demo --bridge xrootd`, small: misbehaving agents upload straight to XRootD; every job done,
    nothing tampered in trusted storage (which is on the XRootD server)."""
    if shutil.which("xrootd") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("xrootd is not installed (required in CI)")
        pytest.skip("xrootd is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    cmd = [sys.executable, "-m", "airlock", "demo", "--bridge", "xrootd", "--jobs", "6", "--events", "300"]
    r = subprocess.run(
        [*cmd, "--work-dir", str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=300
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "XRootD data bridge and trusted storage on https://localhost:" in out
    m = re.search(r"jobs done: (\d+)/(\d+)\s+outputs re-derived and compared: (\d+), tampered or wrong in\s+"
                  r"trusted storage: (\d+)", out)  # fmt: skip
    assert m and m.groups() == ("6", "6", "6", "0"), out[-3000:]
    assert not (tmp_path / "d" / "gateway" / "storage" / "trusted").exists()  # nothing trusted stored locally


def test_a_quarantined_file_changed_on_the_server_after_validation_never_reaches_trusted(xapi: XApi) -> None:
    (jid,) = xapi.submit(job("a", outputs=[{"name": "out.txt", "max_size": 100}]))["jobs"]
    v = xapi.volunteer()
    tid = run_task(xapi, v, {"out.txt": b"the result\n"})
    validate(xapi)
    assert xapi.job(jid)["state"] == "assimilating"
    on_disk = xapi.server.data_root / "quarantine" / str(v.id) / str(tid) / "out.txt"
    on_disk.write_bytes(b"the resulT\n")  # same size, behind the gateway's back
    assert assimilate_pending(xapi.gw.engine, xapi.gw.quarantine, xapi.gw.trusted) == 0
    assert xapi.job(jid)["state"] == "running"  # the result was revoked; replication reissues the job
    assert task_state(xapi, tid).state == "invalid"
    assert "no longer matches" in task_state(xapi, tid).verdict
    assert list(xapi.gw.trusted.list("trusted")) == []
