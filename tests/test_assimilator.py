"""Exactly-once assimilation: the process dies at every step, a restart finishes the job, nothing is
duplicated or lost. The crash is real: `os._exit` in a separate `airlock worker` process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from airlock.db import schema
from airlock.db.engine import read
from airlock.validator.validate import validate_pending

from .helpers import Api, job

CRASH_POINTS = ["assimilate.after_copy", "assimilate.before_commit", "assimilate.after_commit"]


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
