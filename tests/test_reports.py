"""Reports, heartbeats and job descriptions on both databases: only the holder of a live lease reports, once;
bad input gets a clear 4xx and changes nothing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from airlock.core.checksums import digest_bytes
from airlock.db import schema
from airlock.db.engine import read, utcnow

from .helpers import Api, Volunteer, assert_error, job


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"lease_s": 5}


# ------------------------------------------------------------------------------------------------ helpers


def task_row(api: Api, task_id: int) -> Any:
    with read(api.gw.engine) as conn:
        return conn.execute(select(schema.tasks).where(schema.tasks.c.id == task_id)).one()


def set_lease(api: Api, task_id: int, expires: datetime) -> None:
    with api.gw.engine.begin() as conn:
        conn.execute(
            update(schema.tasks).where(schema.tasks.c.id == task_id).values(lease_expires_at=expires)
        )


def raw_report(api: Api, v: Volunteer, task_id: int, body: Any = None, content: bytes | None = None) -> Any:
    url = f"/api/v1/tasks/{task_id}/report"
    hdrs = {**v.auth, "Content-Type": "application/json"}
    if content is not None:
        return api.client.post(url, content=content, headers=hdrs)
    return api.client.post(url, json=body, headers=hdrs)


def out(name: str, data: bytes) -> dict[str, Any]:
    d = digest_bytes(data)
    return {"name": name, "size": len(data), "adler32": d.adler32, "sha256": d.sha256}


def leased(api: Api, *names: str, **kw: Any) -> tuple[Volunteer, list[dict[str, Any]]]:
    api.submit(*[job(n, **kw) for n in names or ("a",)], name=f"b{len(api.volunteers)}")
    v = api.volunteer()
    return v, v.work(slots=len(names) or 1)


# ------------------------------------------------------------------------------------------------ reports


def test_report_of_someone_elses_task_is_forbidden(api: Api) -> None:
    api.submit(job("a"), job("b"))
    a, b = api.volunteer(), api.volunteer()
    (ta,) = a.work()
    (tb,) = b.work()
    before = api.snapshot()
    assert_error(a.report(tb, 0, {"out.txt": b"1"}), 403, "not assigned to you")
    # naming b's host does not help either
    assert_error(a.report(tb, 0, {"out.txt": b"1"}, host_id=b.host_id), 403)
    # nor does naming a's task with b's host
    assert_error(b.report(ta, 0, {"out.txt": b"1"}, host_id=a.host_id), 403)
    assert api.snapshot() == before
    assert task_row(api, tb["task_id"]).state == "leased"
    assert task_row(api, ta["task_id"]).state == "leased"


def test_report_from_your_other_host_is_forbidden(api: Api) -> None:
    v, (t,) = leased(api)
    first_host = v.host_id
    v.register_host(cores=2, memory_mb=2000, disk_mb=2000)
    assert v.host_id != first_host
    before = api.snapshot()
    assert_error(v.report(t, 0, {"out.txt": b"1"}), 403, "another of your hosts")
    assert_error(v.heartbeat(t), 403, "another of your hosts")
    assert api.snapshot() == before
    assert v.report(t, 0, {}, host_id=first_host).status_code == 200


def test_report_of_a_nonexistent_task_is_404(api: Api) -> None:
    v, _ = leased(api)
    before = api.snapshot()
    assert_error(v.report({"task_id": 999_999}, 0), 404, "no task 999999")
    assert_error(v.heartbeat({"task_id": 999_999}), 404, "no task 999999")
    assert api.snapshot() == before


def test_replayed_report_is_409_and_the_first_report_stands(api: Api) -> None:
    v, (t,) = leased(api)
    data = b"the answer\n"
    assert v.upload(t, data).status_code == 201
    first = {"host_id": v.host_id, "exit_code": 0, "cpu_time_s": 1.5, "outputs": [out("out.txt", data)]}
    r = raw_report(api, v, t["task_id"], first)
    assert r.status_code == 200 and r.json() == {"task_id": t["task_id"], "state": "reported"}
    row = task_row(api, t["task_id"])
    before = api.snapshot()
    replays = [
        first,
        {"host_id": v.host_id, "exit_code": 1, "stderr_tail": "oops"},
        {"host_id": v.host_id, "exit_code": 0, "outputs": [out("out.txt", b"something else")]},
    ]
    for replay in replays:
        assert_error(raw_report(api, v, t["task_id"], replay), 409, "already reported")
    assert api.snapshot() == before
    again = task_row(api, t["task_id"])
    assert again._mapping == row._mapping
    assert (again.exit_code, again.cpu_time_s, again.reported_outputs) == (0, 1.5, [out("out.txt", data)])
    # and after validation the answer is the same
    api.settle()
    assert task_row(api, t["task_id"]).state == "valid"
    assert_error(raw_report(api, v, t["task_id"], first), 409, "already reported")


def test_report_after_lease_expiry_is_410(api: Api) -> None:
    v, (t1, t2) = leased(api, "a", "b")
    set_lease(api, t1["task_id"], utcnow() - timedelta(seconds=1))
    before = api.snapshot()
    assert_error(v.report(t1, 0, {}), 410, "lease", "expired")
    assert_error(v.heartbeat(t1), 410, "no longer leased")
    assert api.snapshot() == before
    assert task_row(api, t1["task_id"]).state == "leased"
    # once the expiry loop has run, the task is lost and reissued; a late report is still refused
    api.loops()
    assert task_row(api, t1["task_id"]).state == "lost"
    assert_error(v.report(t1, 0, {}), 410)
    view = api.job(t1["job_id"])
    assert [x["state"] for x in view["tasks"]] == ["lost", "ready"]
    # the other task, whose lease is live, still reports fine
    assert v.report(t2, 0, {}).status_code == 200


def test_report_with_an_undeclared_output_is_400_and_changes_nothing(api: Api) -> None:
    v, (t,) = leased(api)
    before = api.snapshot()
    body = {"host_id": v.host_id, "exit_code": 0, "outputs": [out("out.txt", b"1"), out("secret.txt", b"2")]}
    assert_error(raw_report(api, v, t["task_id"], body), 400, "did not declare", "secret.txt")
    twice = {"host_id": v.host_id, "exit_code": 0, "outputs": [out("out.txt", b"1"), out("out.txt", b"2")]}
    assert_error(raw_report(api, v, t["task_id"], twice), 400, "twice")
    assert api.snapshot() == before
    row = task_row(api, t["task_id"])
    assert (row.state, row.exit_code, row.reported_outputs, row.reported_at) == ("leased", None, None, None)
    assert v.report(t, 0, {"out.txt": b"1"}).status_code == 200  # a correct report is still possible


def test_malformed_reports_are_refused_with_the_reason(api: Api) -> None:
    v, (t,) = leased(api)
    good_out = out("out.txt", b"1")
    before = api.snapshot()
    for content in (b"{not json", b'{"host_id": 1,', b"\xff\xfe"):
        assert_error(raw_report(api, v, t["task_id"], content=content), 400, "not valid JSON")
    assert_error(raw_report(api, v, t["task_id"], content=b""), 422, "body", "required")
    wrong_types: list[tuple[Any, str]] = [
        ({"host_id": "abc", "exit_code": 0}, "host_id"),
        ({"host_id": v.host_id, "exit_code": "zero"}, "exit_code"),
        ({"host_id": v.host_id, "exit_code": 1.5}, "exit_code"),
        ({"host_id": v.host_id}, "exit_code"),
        ({"host_id": v.host_id, "exit_code": 0, "outputs": "out.txt"}, "outputs"),
        ({"host_id": v.host_id, "exit_code": 0, "outputs": [{**good_out, "size": -1}]}, "size"),
        ({"host_id": v.host_id, "exit_code": 0, "outputs": [{**good_out, "name": "../x"}]}, "name"),
        ({"host_id": v.host_id, "exit_code": 0, "cpu_time_s": -3}, "cpu_time_s"),
        ({"host_id": v.host_id, "exit_code": 0, "stderr_tail": "x" * 70_000}, "stderr_tail"),
        ([v.host_id, 0], "body"),
        ("report", "body"),
        (None, "body"),
    ]
    for body, field in wrong_types:
        assert_error(raw_report(api, v, t["task_id"], body), 422, field)
    unknown: list[tuple[Any, str]] = [
        ({"host_id": v.host_id, "exit_code": 0, "state": "valid"}, "state"),
        ({"host_id": v.host_id, "exit_code": 0, "verdict": "passed"}, "verdict"),
        (
            {"host_id": v.host_id, "exit_code": 0, "outputs": [{**good_out, "location": "trusted/x"}]},
            "location",
        ),
    ]
    for body, field in unknown:
        assert_error(raw_report(api, v, t["task_id"], body), 422, field, "extra")
    r = raw_report(api, v, t["task_id"], {"host_id": v.host_id, "exit_code": 0, "x": 1})
    assert r.json()["error"] == "invalid_request"
    assert api.snapshot() == before
    assert task_row(api, t["task_id"]).state == "leased"


# ------------------------------------------------------------------------------------------- heartbeats


def test_heartbeat_extends_the_lease(api: Api) -> None:
    v, (t,) = leased(api)
    soon = utcnow() + timedelta(seconds=1)
    set_lease(api, t["task_id"], soon)
    r = v.heartbeat(t)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["abort"] is False
    new = datetime.fromisoformat(reply["lease_expires_at"])
    assert new > soon + timedelta(seconds=2)
    assert new <= utcnow() + timedelta(seconds=api.gw.settings.lease_s)
    stored = task_row(api, t["task_id"]).lease_expires_at
    assert abs((stored - new).total_seconds()) < 0.01
    # the extended lease keeps the task alive through an expiry pass
    assert api.loops() == 0
    assert task_row(api, t["task_id"]).state == "leased"
    assert v.report(t, 0, {}).status_code == 200


def test_heartbeat_never_extends_past_the_deadline(api: Api) -> None:
    v, (t,) = leased(api)
    deadline = utcnow() + timedelta(seconds=2)
    with api.gw.engine.begin() as conn:
        conn.execute(update(schema.tasks).where(schema.tasks.c.id == t["task_id"]).values(deadline=deadline))
    r = v.heartbeat(t)
    assert r.status_code == 200
    assert datetime.fromisoformat(r.json()["lease_expires_at"]) <= deadline


def test_heartbeat_of_someone_elses_task_is_forbidden(api: Api) -> None:
    api.submit(job("a"), job("b"))
    a, b = api.volunteer(), api.volunteer()
    a.work()
    (tb,) = b.work()
    before = task_row(api, tb["task_id"])
    assert_error(a.heartbeat(tb), 403, "not assigned to you")
    assert task_row(api, tb["task_id"])._mapping == before._mapping


def test_heartbeat_on_a_cancelled_jobs_task_says_abort(api: Api) -> None:
    v, (t,) = leased(api)
    r = api.op("POST", f"/api/v1/jobs/{t['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = v.heartbeat(t)
    assert r.status_code == 200, r.text
    assert r.json()["abort"] is True
    assert_error(v.report(t, 0, {}), 410, "aborted")
    assert task_row(api, t["task_id"]).state == "aborted"
    # a second cancel is a clear conflict
    assert_error(api.op("POST", f"/api/v1/jobs/{t['job_id']}/cancel"), 409, "cannot be cancelled")


# ----------------------------------------------------------------------------------- job descriptions


def submit_raw(api: Api, body: Any = None, content: bytes | None = None) -> Any:
    if content is not None:
        return api.op(
            "POST", "/api/v1/batches", content=content, headers={"Content-Type": "application/json"}
        )
    return api.op("POST", "/api/v1/batches", json=body)


def batch(*jobs: Any, **kw: Any) -> dict[str, Any]:
    return {"name": "bad", "jobs": list(jobs), **kw}


def test_bad_job_descriptions_are_refused_with_the_reason_and_change_nothing(api: Api) -> None:
    good_sha = api.op("POST", "/api/v1/inputs", content=b"cached input\n").json()["sha256"]
    missing_sha = "ab" * 32
    cases: list[tuple[Any, str]] = [
        (batch(job("a", colour="red")), "colour"),
        (batch(job("a"), priority=5), "priority"),
        (batch(job("a", resources={"cores": 1, "gpus": 2})), "gpus"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": 10, "mode": "0755"}])), "mode"),
        (batch(job("a", copies=2, quorum=3)), "quorum (3) cannot exceed copies (2)"),
        (batch(job("a", copies=3, quorum=2, max_attempts=2)), "max_attempts (2) must be at least copies (3)"),
        (batch(job("a"), job("b"), job("a")), "job name 'a' appears twice"),
        (
            batch(job("a", outputs=[{"name": "o.txt", "max_size": 1}, {"name": "o.txt", "max_size": 2}])),
            "o.txt",
        ),
        (
            batch(job("a", inputs=[{"name": "out.txt", "sha256": good_sha}])),
            "file names must be unique within a job: ['out.txt']",
        ),
        (batch(job("a", outputs=[{"name": "../x", "max_size": 1}])), "'../x'"),
        (batch(job("a", outputs=[{"name": "a/b", "max_size": 1}])), "'a/b'"),
        (batch(job("a", outputs=[{"name": ".hidden", "max_size": 1}])), "'.hidden'"),
        (batch(job("a", inputs=[{"name": "../in", "sha256": good_sha}])), "'../in'"),
        (batch(job("a", inputs=[{"name": "in.dat", "sha256": missing_sha}])), "not in the input cache"),
        (batch(job("a", inputs=[{"name": "in.dat", "sha256": "xyz"}])), "sha256"),
        (batch(job("a", inputs=[{"name": "in.dat", "sha256": good_sha, "size": 5}])), "bytes in the cache"),
        (batch(job("a", inputs=[{"name": "in.dat", "sha256": good_sha, "size": -1}])), "size"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": -5}])), "negative"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": 0}])), "max_size"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": "ten"}])), "'ten'"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": "10 parsecs"}])), "10 parsecs"),
        (batch(job("a", outputs=[{"name": "out.txt", "max_size": True}])), "max_size"),
        (batch(job("a", outputs=[])), "outputs"),
        (batch(job("a", command=[])), "command"),
        (batch(job("a", resources={"cores": 0})), "cores"),
        (batch(job("a", copies=0)), "copies"),
        (batch(job("a", params={"events": float("inf")})), "params.events is not a number JSON can hold"),
        (batch(job("a", params={"cuts": [1, {"pt": float("nan")}]})), "params.cuts.1.pt"),
        (batch(), "jobs"),
        ({"name": "bad"}, "jobs"),
        ({"jobs": [job("a")]}, "name"),
        (batch(job("a"), defaults="fast"), "defaults"),
        (batch("not a job"), "jobs.0"),
    ]
    before = api.snapshot()
    files_before = sorted(p for p in api.gw.settings.storage_dir.rglob("*") if p.is_file())
    for body, fragment in cases:
        r = submit_raw(api, content=json.dumps(body).encode())  # (json.dumps writes Infinity and NaN)
        assert r.status_code in (400, 422), (fragment, r.status_code, r.text)
        assert_error(r, r.status_code, fragment)
        assert api.snapshot() == before, fragment
    # a batch whose first job is fine and whose second is not creates nothing at all
    r = submit_raw(api, batch(job("a"), job("b", inputs=[{"name": "i", "sha256": missing_sha}])))
    assert_error(r, 400, "job 'b'", "not in the input cache")
    assert api.snapshot() == before
    assert sorted(p for p in api.gw.settings.storage_dir.rglob("*") if p.is_file()) == files_before
    assert api.op("GET", "/api/v1/batches").json() == []


def test_non_object_and_garbage_bodies_are_refused(api: Api) -> None:
    before = api.snapshot()
    for content in (b"{not json", b"name: yaml\n"):
        assert_error(submit_raw(api, content=content), 400, "not valid JSON")
    assert_error(submit_raw(api, content=b""), 422, "body", "required")
    assert_error(submit_raw(api, content=b"null"), 422, "body")
    for body in ([job("a")], "batch", 42):
        r = submit_raw(api, body)
        assert r.status_code in (400, 422), r.text
        body_json = assert_error(r, r.status_code)
        assert any(w in body_json["message"].lower() for w in ("dict", "mapping", "object")), body_json
    assert api.snapshot() == before


def test_size_strings_with_units_are_accepted(api: Api) -> None:
    sizes = {"a.out": "10MB", "b.out": "2 GiB", "c.out": "512k", "d.out": "1.5kB", "e.out": 1048576}
    expect = {"a.out": 10_000_000, "b.out": 2 * 2**30, "c.out": 512_000, "d.out": 1500, "e.out": 1048576}
    r = submit_raw(api, batch(job("a", outputs=[{"name": n, "max_size": s} for n, s in sizes.items()])))
    assert r.status_code == 201, r.text
    v = api.volunteer()
    (t,) = v.work()
    assert {o["name"]: o["max_size"] for o in t["outputs"]} == expect


# ------------------------------------------------------------------------------ out-of-range input values


def test_out_of_range_exit_code_is_a_clear_422(api: Api) -> None:
    v, (t,) = leased(api)
    before = api.snapshot()
    r = raw_report(api, v, t["task_id"], {"host_id": v.host_id, "exit_code": 2**64})
    assert_error(r, 422, "exit_code")
    assert api.snapshot() == before
    assert task_row(api, t["task_id"]).state == "leased"


def test_out_of_range_host_resources_are_a_clear_422(api: Api) -> None:
    v, _ = leased(api)
    before = api.snapshot()
    body = {"platform": "x86_64-pc-linux-gnu", "cores": 1, "memory_mb": 2**64, "disk_mb": 2**64}
    r = api.client.post("/api/v1/hosts", json=body, headers=v.auth)
    assert_error(r, 422, "memory_mb")
    assert api.snapshot() == before


def test_malformed_checksums_in_a_report_are_refused(api: Api) -> None:
    v, (t,) = leased(api)
    before = api.snapshot()
    bad = [
        {"name": "out.txt", "size": 1, "adler32": "nothex!!", "sha256": "ab" * 32},
        {"name": "out.txt", "size": 1, "adler32": "00000001", "sha256": "x" * 100_000},
    ]
    for o in bad:
        r = raw_report(api, v, t["task_id"], {"host_id": v.host_id, "exit_code": 0, "outputs": [o]})
        assert_error(r, 422)
    assert api.snapshot() == before
    assert task_row(api, t["task_id"]).state == "leased"


def test_the_first_report_moves_a_running_job_to_validating_and_later_ones_leave_it(api: Api) -> None:
    """Each report settles the job in its own transaction: a running job becomes a validating one once,
    with one audit event, and a second copy's report changes nothing more (no task is created)."""
    (jid,) = api.submit(job("twice", copies=2, quorum=2))["jobs"]
    a, b = api.volunteer(), api.volunteer()
    (ta,), (tb,) = a.work(), b.work()
    assert api.job(jid)["state"] == "running"
    a.complete(ta)
    assert api.job(jid)["state"] == "validating"
    b.complete(tb)
    assert api.job(jid)["state"] == "validating"
    t = schema.tasks
    with read(api.gw.engine) as conn:
        moves = conn.execute(
            select(schema.events.c.action).where(
                schema.events.c.object_type == "job",
                schema.events.c.object_id == jid,
                schema.events.c.action == "job.validating",
            )
        ).all()
        tasks = conn.execute(select(t.c.state).where(t.c.job_id == jid)).scalars().all()
    assert len(moves) == 1
    assert sorted(tasks) == ["reported", "reported"]
