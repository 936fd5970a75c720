"""The scheduler on both databases: fit, replication on distinct volunteers, quota, leases, reissue."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from airlock.db import schema
from airlock.db.engine import utcnow

from .helpers import Api, job


def _expire(api: Api, task_id: int) -> None:
    with api.gw.engine.begin() as conn:
        conn.execute(
            update(schema.tasks)
            .where(schema.tasks.c.id == task_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_host_only_gets_tasks_that_fit(api: Api) -> None:
    api.submit(
        job("big-cores", resources={"cores": 8}),
        job("big-memory", resources={"memory_mb": 16000}),
        job("big-disk", resources={"disk_mb": 100_000}),
        job("small", resources={"cores": 1, "memory_mb": 100, "disk_mb": 10}),
    )
    small = api.volunteer(cores=2, memory_mb=4000, disk_mb=20_000)
    got = small.work(slots=8)
    assert [api.job(t["job_id"])["name"] for t in got] == ["small"]
    big = api.volunteer(cores=16, memory_mb=32000, disk_mb=200_000)
    assert {api.job(t["job_id"])["name"] for t in big.work(slots=8)} == {
        "big-cores",
        "big-memory",
        "big-disk",
    }


def test_free_resources_in_request_limit_the_tasks(api: Api) -> None:
    api.submit(*[job(f"j{i}", resources={"cores": 2}) for i in range(4)])
    v = api.volunteer(cores=8)
    assert len(v.work(slots=4, free_cores=4)) == 2


def test_replicas_go_to_distinct_volunteers(api: Api) -> None:
    (jid,) = api.submit(job("r", copies=3, quorum=2, max_attempts=5))["jobs"]
    a = api.volunteer()
    assert len(a.work(slots=3)) == 1  # one copy per volunteer, however many slots
    assert a.work(slots=3) == []
    b, c = api.volunteer(), api.volunteer()
    assert len(b.work()) == 1 and len(c.work()) == 1
    tasks = api.job(jid)["tasks"]
    assert sorted(t["volunteer_id"] for t in tasks) == sorted([a.id, b.id, c.id])
    assert {t["state"] for t in tasks} == {"leased"}


def test_every_task_is_attributed_to_volunteer_and_host(api: Api) -> None:
    (jid,) = api.submit(job("x"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    v.complete(t)
    api.settle()
    view = api.job(jid)
    (task,) = view["tasks"]
    assert (task["volunteer_id"], task["host_id"]) == (v.id, v.host_id)
    assert (view["outputs"][0]["volunteer_id"], view["outputs"][0]["host_id"]) == (v.id, v.host_id)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"daily_quota_per_core": 3}


def test_daily_quota_stops_a_host_and_errors_shrink_it(api: Api) -> None:
    api.submit(*[job(f"j{i}") for i in range(20)])
    v = api.volunteer(cores=1)
    first = [t for _ in range(3) for t in v.work(slots=10)]  # a 1-core host runs one 1-core task at a time
    assert len(first) == 3  # 3 per core per day
    r = v.request(slots=1)
    assert r.json()["tasks"] == [] and "daily quota" in r.json()["message"]
    for t in first:  # a broken host: every task errors
        v.complete(t, exit_code=1)
    api.settle()
    (host,) = [h for h in api.op("GET", "/api/v1/hosts").json() if h["id"] == v.host_id]
    assert host["n_error"] == 3 and host["daily_quota"] == 1


def test_valid_results_double_quota_up_to_the_project_maximum(api: Api) -> None:
    api.submit(*[job(f"j{i}") for i in range(6)])
    v = api.volunteer(cores=1)
    with api.gw.engine.begin() as conn:
        conn.execute(update(schema.hosts).where(schema.hosts.c.id == v.host_id).values(daily_quota=1))
    (t,) = v.work(slots=5)
    v.complete(t)
    api.settle()
    quota = {h["id"]: h["daily_quota"] for h in api.op("GET", "/api/v1/hosts").json()}
    assert quota[v.host_id] == 2
    for t in v.work(slots=5):
        v.complete(t)
    api.settle()
    quota = {h["id"]: h["daily_quota"] for h in api.op("GET", "/api/v1/hosts").json()}
    assert quota[v.host_id] == 3  # capped at daily_quota_per_core


def test_expired_lease_is_reissued_to_another_host(api: Api) -> None:
    (jid,) = api.submit(job("x", max_attempts=3))["jobs"]
    a, b = api.volunteer(), api.volunteer()
    (t,) = a.work()
    _expire(api, t["task_id"])
    api.settle()
    tasks = api.job(jid)["tasks"]
    assert [x["state"] for x in tasks] == ["lost", "ready"]
    assert a.report(t, 0, {"out.txt": b"late"}).status_code == 410
    (t2,) = b.work()
    b.complete(t2)
    api.settle()
    assert api.job(jid)["state"] == "done"
    (host_a,) = [h for h in api.op("GET", "/api/v1/hosts").json() if h["id"] == a.host_id]
    assert host_a["n_lost"] == 1


def test_a_volunteer_whose_task_gave_nothing_may_take_the_job_again(api: Api) -> None:
    """A pool of one volunteer (a lab's cluster under one account): after its host lost the task, or its
    run failed, the reissued task must still reach it, or the job would wait for ever."""
    (lost_job,) = api.submit(job("lost", max_attempts=3))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    _expire(api, t["task_id"])
    api.settle()
    (again,) = v.work()
    assert again["job_id"] == lost_job and again["task_id"] != t["task_id"]
    v.complete(again)
    api.settle()
    assert api.job(lost_job)["state"] == "done"

    (failed_job,) = api.submit(job("failed", max_attempts=3))["jobs"]
    (t,) = v.work()
    v.complete(t, exit_code=1)
    api.settle()
    assert [x["state"] for x in api.job(failed_job)["tasks"]] == ["error", "ready"]
    (again,) = v.work()
    assert again["job_id"] == failed_job


def test_a_volunteer_whose_result_was_rejected_never_gets_the_job_again(api: Api) -> None:
    (jid,) = api.submit(job("x", copies=2, quorum=2, max_attempts=6))["jobs"]
    a, b = api.volunteer(), api.volunteer()
    (ta,) = a.work()
    (tb,) = b.work()
    a.complete(ta, data=b"one answer")
    b.complete(tb, data=b"another answer")
    api.settle()  # no quorum: both results disagree, the job asks for more copies
    assert a.work() == [] and b.work() == []  # neither author gets a second try
    c = api.volunteer()
    assert [t["job_id"] for t in c.work()] == [jid]


def test_job_fails_when_attempts_run_out(api: Api) -> None:
    (jid,) = api.submit(job("x", max_attempts=2))["jobs"]
    for _ in range(2):
        v = api.volunteer()
        (t,) = v.work()
        _expire(api, t["task_id"])
        api.settle()
    view = api.job(jid)
    assert view["state"] == "failed"
    assert [t["state"] for t in view["tasks"]] == ["lost", "lost"]
    assert api.volunteer().work() == []


def test_heartbeat_keeps_the_lease(api: Api) -> None:
    api.submit(job("x"))
    v = api.volunteer()
    (t,) = v.work()
    r = v.heartbeat(t)
    assert r.status_code == 200 and r.json()["abort"] is False
    api.settle()
    assert api.job(t["job_id"])["tasks"][0]["state"] == "leased"


def test_cancelled_job_aborts_its_tasks(api: Api) -> None:
    (jid,) = api.submit(job("x", copies=2, quorum=1))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    r = api.op("POST", f"/api/v1/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert {x["state"] for x in r.json()["tasks"]} == {"aborted"}
    assert v.heartbeat(t).json()["abort"] is True
    assert api.volunteer().work() == []
    assert api.op("POST", f"/api/v1/jobs/{jid}/cancel").status_code == 409


def test_concurrent_dispatch_never_leases_a_task_twice(api: Api) -> None:
    n_jobs = 60
    api.submit(*[job(f"j{i}") for i in range(n_jobs)])
    vols = [api.volunteer() for _ in range(6)]
    got: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(v: Any) -> None:
        for _ in range(15):
            r = v.request(slots=2)
            if r.status_code != 200:
                errors.append(r.text)
                continue
            with lock:
                got.extend(t["task_id"] for t in r.json()["tasks"])

    threads = [threading.Thread(target=worker, args=(v,)) for v in vols]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(got) == len(set(got)) == n_jobs
    leased = api.count(schema.tasks, schema.tasks.c.state == "leased")
    assert leased == n_jobs


def test_cancelling_a_batch_cancels_only_its_unfinished_jobs(api: Api) -> None:
    done_id, leased_id, queued_id = api.submit(job("done"), job("leased"), job("queued"))["jobs"]
    (other,) = api.submit(job("other batch"), name="other")["jobs"]
    v = api.volunteer(cores=1)
    (t,) = v.work()
    v.complete(t)
    api.settle()
    assert api.job(done_id)["state"] == "done"
    (t2,) = v.work()
    assert t2["job_id"] == leased_id
    r = api.op("POST", "/api/v1/batches/1/cancel")
    assert r.status_code == 200 and r.json() == {"cancelled": 2}
    states = {jid: api.job(jid)["state"] for jid in (done_id, leased_id, queued_id, other)}
    assert states == {done_id: "done", leased_id: "cancelled", queued_id: "cancelled", other: "queued"}
    assert v.heartbeat(t2).json()["abort"] is True
    assert api.op("POST", "/api/v1/batches/99/cancel").status_code == 404
