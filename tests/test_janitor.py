"""The janitor: quarantine leftovers go after the retention period, and only leftovers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from airlock.assimilator import janitor
from airlock.assimilator.janitor import sweep_quarantine
from airlock.bridge.quarantine import output_key
from airlock.db import schema
from airlock.storage.base import STAGING

from .helpers import Api, job


def test_rejected_output_is_kept_for_retention_then_deleted(api: Api) -> None:
    api.submit(job("x", max_attempts=3))
    v = api.volunteer()
    (t,) = v.work()
    v.complete(t, data=b"bad", exit_code=1)  # an error: its upload is a leftover
    api.settle()
    key = output_key(v.id, t["task_id"], "out.txt")
    s = api.gw.settings
    s.quarantine_retention_s = 3600
    assert sweep_quarantine(api.gw.engine, api.gw.quarantine, s) == 0
    assert api.gw.quarantine.exists(key)
    s.quarantine_retention_s = 0
    assert sweep_quarantine(api.gw.engine, api.gw.quarantine, s) == 1
    assert not api.gw.quarantine.exists(key)
    f = schema.files
    assert api.count(f, f.c.kind == "output", f.c.state == "deleted") == 1


def test_output_of_a_running_job_is_never_swept(api: Api) -> None:
    (jid,) = api.submit(job("x", copies=2, quorum=2))["jobs"]
    a = api.volunteer()
    (t,) = a.work()
    a.complete(t)
    api.settle()  # valid, waiting for the second copy
    api.gw.settings.quarantine_retention_s = 0
    assert sweep_quarantine(api.gw.engine, api.gw.quarantine, api.gw.settings) == 0
    assert api.gw.quarantine.exists(output_key(a.id, t["task_id"], "out.txt"))
    assert api.job(jid)["state"] == "running"


def test_stale_partial_uploads_are_removed(api: Api) -> None:
    staging = api.gw.settings.storage_dir / "quarantine" / STAGING
    staging.mkdir(parents=True)
    stale, fresh = staging / "out.txt.partial-aaa", staging / "out.txt.partial-bbb"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert sweep_quarantine(api.gw.engine, api.gw.quarantine, api.gw.settings) == 1
    assert not stale.exists() and fresh.exists()


def test_the_sweep_of_temporaries_lists_the_staging_folders_only(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusted storage keeps every result ever assimilated: a sweep that walked it would cost more with
    every job, once a minute. The janitor lists each area's staging folder and nothing else."""
    a = api.volunteer()
    api.submit(job("x"))
    (t,) = a.work()
    a.complete(t)
    api.settle()  # valid and assimilated: a file in trusted storage, its quarantine folder gone
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        listed.append(Path(path).relative_to(api.gw.settings.storage_dir).as_posix())
        return real_scandir(path)

    def no_walk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the sweep walked a tree: os.walk{args}")

    monkeypatch.setattr(os, "walk", no_walk)
    monkeypatch.setattr(os, "scandir", scandir)
    sweep_quarantine(api.gw.engine, api.gw.quarantine, api.gw.settings, trusted=api.gw.trusted)
    assert listed == [f"quarantine/{STAGING}", f"trusted/{STAGING}"]


def test_leftovers_go_in_batches_and_every_one_is_recorded(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(janitor, "BATCH", 2)
    api.submit(*[job(f"x{i}", max_attempts=3) for i in range(5)])
    v = api.volunteer(cores=8)
    tasks = v.work(slots=5)
    assert len(tasks) == 5
    for t in tasks:
        v.complete(t, data=b"bad", exit_code=1)
    api.settle()
    api.gw.settings.quarantine_retention_s = 0
    assert sweep_quarantine(api.gw.engine, api.gw.quarantine, api.gw.settings) == 5
    f = schema.files
    assert api.count(f, f.c.kind == "output", f.c.state == "deleted") == 5
    assert list(api.gw.quarantine.list("quarantine")) == []
