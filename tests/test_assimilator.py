"""Exactly-once assimilation: the process dies at every step, a restart finishes the job, nothing is
duplicated or lost. The crash is real: `os._exit` in a separate `airlock worker` process."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import event, select

from airlock.assimilator import assimilate
from airlock.db import schema
from airlock.db.engine import READ_ONLY, read
from airlock.validator.validate import validate_pending

from .helpers import Api, job

CRASH_POINTS = [
    "assimilate.after_copy",
    "assimilate.after_syncs",
    "assimilate.before_commit",
    "assimilate.after_commit",
]


def _worker_once(api: Api, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    s = api.gw.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    if crash_at:
        env["AIRLOCK_CRASH_AT"] = crash_at
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "airlock",
            "worker",
            "--once",
            "--data-dir",
            str(s.data_dir),
            "--database-url",
            s.db_url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_assimilator_killed_at_any_point_finishes_once_on_restart(api: Api, crash_at: str) -> None:
    jobs = api.submit(
        job("a", outputs=[{"name": "out.txt", "max_size": 100}, {"name": "log.txt", "max_size": 100}])
    )
    (jid,) = jobs["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    assert v.upload(t, b"the result\n", "out.txt").status_code == 201
    assert v.upload(t, b"the log\n", "log.txt").status_code == 201
    assert v.report(t, 0, {"out.txt": b"the result\n", "log.txt": b"the log\n"}).status_code == 200
    validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings)
    assert api.job(jid)["state"] == "assimilating"

    crashed = _worker_once(api, crash_at)
    assert crashed.returncode == 86, crashed.stderr
    expected_state = "done" if crash_at == "assimilate.after_commit" else "assimilating"
    assert api.job(jid)["state"] == expected_state

    again = _worker_once(api, None)
    assert again.returncode == 0, again.stderr
    view = api.job(jid)
    assert view["state"] == "done"
    assert sorted((o["name"], o["state"]) for o in view["outputs"]) == [
        ("log.txt", "trusted"),
        ("out.txt", "trusted"),
    ]
    f, e = schema.files, schema.events
    assert api.count(f, f.c.kind == "trusted") == 2
    assert api.count(e, e.c.action == "job.done", e.c.object_id == jid) == 1
    with read(api.gw.engine) as conn:
        keys = dict(conn.execute(select(f.c.name, f.c.location).where(f.c.kind == "trusted")).all())
    with api.gw.trusted.open_read(keys["out.txt"]) as fh:
        assert fh.read() == b"the result\n"
    assert sorted(api.gw.trusted.list("trusted")) == sorted(keys.values())
    # the quarantined copies are gone (moved), even when the crash came between commit and delete
    if crash_at == "assimilate.after_commit":
        api.gw.settings.quarantine_retention_s = 0
        api.settle()
    assert list(api.gw.quarantine.list("quarantine")) == []
    assert api.count(f, f.c.kind == "output", f.c.state == "quarantined") == 0


def test_a_pass_takes_the_writer_turn_once_a_batch_and_records_every_deletion(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy gateway each wait for the writer turn costs the assimilator more than a batch's work,
    so a batch's deletions are recorded by the next batch's transaction (the last by one of its own)."""
    monkeypatch.setattr(assimilate, "BATCH", 10)  # smaller batches, the same logic: a quicker test
    n = assimilate.BATCH + 3  # two batches
    api.submit(*[job(f"j{i}") for i in range(n)])
    v = api.volunteer(cores=64)
    while tasks := v.work(slots=8):
        for t in tasks:
            v.complete(t, data=b"result %d\n" % t["task_id"])
    while validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings):
        pass
    writes: list[bool] = []

    def count(conn: Any) -> None:
        writes.append(not conn.get_execution_options().get(READ_ONLY))

    event.listen(api.gw.engine, "begin", count)
    try:
        assert assimilate.assimilate_pending(api.gw.engine, api.gw.quarantine, api.gw.trusted) == n
    finally:
        event.remove(api.gw.engine, "begin", count)
    assert writes.count(True) == 3  # two batches, then the last batch's deletions
    f = schema.files
    assert api.count(f, f.c.kind == "output", f.c.state == "deleted") == n
    assert api.count(f, f.c.kind == "trusted") == n
    assert list(api.gw.quarantine.list("quarantine")) == []
