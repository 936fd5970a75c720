"""The core path on both databases: submit, dispatch, upload, report, validate, assimilate."""

from __future__ import annotations

from .helpers import Api, job


def test_job_runs_end_to_end_and_output_reaches_trusted_storage(api: Api) -> None:
    batch = api.submit(job("a"), job("b"))
    v = api.volunteer()
    tasks = v.work(slots=4)
    assert sorted(t["job_id"] for t in tasks) == sorted(batch["jobs"])
    for t in tasks:
        v.complete(t, data=f"result of {t['job_id']}\n".encode())
    api.settle()
    for jid in batch["jobs"]:
        view = api.job(jid)
        assert view["state"] == "done"
        (out,) = view["outputs"]
        assert out["state"] == "trusted" and out["volunteer_id"] == v.id and out["host_id"] == v.host_id
        r = api.op("GET", f"/api/v1/jobs/{jid}/outputs/out.txt")
        assert r.status_code == 200 and r.content == f"result of {jid}\n".encode()
    # the quarantined copies were moved, not copied
    assert list(api.gw.quarantine.list("quarantine")) == []
