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


def test_a_volunteers_quarantine_folder_is_kept_and_no_folder_is_made_or_removed_per_task(api: Api) -> None:
    """In the gateway's own quarantine a task's outputs are files of its volunteer's folder: no folder is
    made for one task's upload and removed after its assimilation (on ext4 without a journal, each inode
    freed makes the allocation of the next ones slower for minutes)."""
    batch = api.submit(*(job(f"j{i}") for i in range(3)))
    v = api.volunteer()
    folder = api.gw.settings.storage_dir / "quarantine" / str(v.id)
    task_ids: list[int] = []
    for t in v.work(slots=3):
        v.complete(t, data=f"result of {t['job_id']}\n".encode())
        task_ids.append(t["task_id"])
    entries = list(folder.iterdir())
    assert sorted(p.name for p in entries) == sorted(f"{t}.out.txt" for t in task_ids)
    assert all(p.is_file() for p in entries)
    api.settle()
    assert all(api.job(jid)["state"] == "done" for jid in batch["jobs"])
    assert folder.is_dir() and list(folder.iterdir()) == []  # kept for the volunteer's next tasks
