"""The vacuum variant (CMS@home inside BOINC): the scheduler sends pilots, not tasks; a pilot carries a
short-lived token of its own volunteer in the project-specific preferences, and the Airlock agent it
starts pulls tasks through the native API with it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from airlock.boinc.apps import sign_app, wrapper_path
from airlock.boinc.signing import generate_key, private_pem
from airlock.credentials.tokens import COMPUTE_SCOPES, Grant, Issued
from airlock.db import schema
from airlock.db.engine import read

from .helpers import Api
from .test_boinc_project import Client, acks, done, job_spec, messages, results_of


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"boinc_vacuum": True, "boinc_pilot_hours": 2}


@pytest.fixture
def vacuum(api: Api, tmp_path: Path) -> Api:
    (tmp_path / "key.pem").write_bytes(private_pem(generate_key()))
    sign_app(tmp_path / "key.pem", api.gw.settings.data_dir, "airlock_vacuum", 100, [wrapper_path()])
    return api


def prefs(reply: ET.Element) -> dict[str, str]:
    specific = reply.find("project_preferences/project_specific")
    return {} if specific is None else {el.tag: el.text or "" for el in specific}


def test_pilots_carry_a_narrow_token_and_no_task(vacuum: Api) -> None:
    api = vacuum
    client = Client(api, ncpus=2)
    idle = client.rpc()
    assert results_of(idle) == [] and "no work" in messages(idle) and prefs(idle) == {}
    api.submit(job_spec("j1"), job_spec("j2"))
    reply = client.rpc()
    pilots = results_of(reply)
    assert len(pilots) == 2  # one per idle core
    wu = reply.find("workunit")
    assert wu is not None and wu.findtext("app_name") == "airlock_vacuum"
    assert wu.findtext("command_line") == "--vacuum --hours 2"
    assert api.count(schema.tasks, schema.tasks.c.state == "leased") == 0  # the agent leases them itself
    given = prefs(reply)
    assert given["airlock_gateway"] == "http://testserver"
    claims = api.gw.issuer.verify(given["airlock_token"])
    assert claims.volunteer_id == client.volunteer_id and set(claims.scopes) == set(COMPUTE_SCOPES)
    # the agent uses it on the native API
    auth = {"Authorization": f"Bearer {given['airlock_token']}"}
    r = api.client.post("/api/v1/hosts", json={"platform": "x86_64-pc-linux-gnu", "cores": 1,
                                               "memory_mb": 2000, "disk_mb": 2000}, headers=auth)  # fmt: skip
    assert r.status_code == 201, r.text
    r = api.client.post("/api/v1/work", json={"host_id": r.json()["host_id"]}, headers=auth)
    assert r.status_code == 200 and len(r.json()["tasks"]) == 1
    # while its pilots run, every RPC brings a fresh token; their results are acknowledged
    names = tuple(p.findtext("name") or "" for p in pilots)
    busy = client.rpc(others=names)
    assert results_of(busy) == [] and prefs(busy)["airlock_token"] != given["airlock_token"]
    finished = client.rpc(work=0, results=tuple(replace(done(n, {}, []), state=5) for n in names))
    assert acks(finished) == list(names)


def test_a_blocked_volunteer_loses_its_pilots_and_its_token(vacuum: Api) -> None:
    api = vacuum
    api.submit(job_spec("j1"))
    client = Client(api)
    reply = client.rpc()
    (pilot,) = results_of(reply)
    token = prefs(reply)["airlock_token"]
    api.op("POST", f"/api/v1/volunteers/{client.volunteer_id}/block")
    blocked = client.rpc(others=(pilot.findtext("name") or "",))
    assert [el.findtext("name") for el in blocked.findall("result_abort")] == [pilot.findtext("name")]
    assert prefs(blocked) == {}
    r = api.client.post("/api/v1/work", json={"host_id": 1}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403


def test_another_hosts_pilot_is_aborted(vacuum: Api) -> None:
    api = vacuum
    api.submit(job_spec("j1"))
    ada, bob = Client(api), Client(api, "bob", "bob@example.org")
    (pilot,) = results_of(ada.rpc())
    bob.rpc(work=0)
    reply = bob.rpc(work=0, others=(pilot.findtext("name") or "",))
    assert [el.findtext("name") for el in reply.findall("result_abort")] == [pilot.findtext("name")]


def test_the_pilots_token_is_signed_after_the_rpc_commits(
    vacuum: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The access token in the preferences is signed once the RPC's transaction (which records its
    credential) has committed: another connection already sees the row when it is signed."""
    api = vacuum
    api.submit(job_spec("j1"))
    client = Client(api)
    issuer = api.gw.issuer
    seen: list[bool] = []
    sign = issuer.sign

    def signing(grant: Grant) -> Issued:
        c = schema.credentials
        with read(api.gw.engine) as conn:
            kind = conn.execute(select(c.c.kind).where(c.c.jti == grant.jti)).scalar_one_or_none()
        seen.append(kind == "access")
        return sign(grant)

    monkeypatch.setattr(issuer, "sign", signing)
    token = prefs(client.rpc())["airlock_token"]
    assert seen == [True]
    assert issuer.verify(token).volunteer_id == client.volunteer_id
