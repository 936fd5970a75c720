"""The statements of a volunteer cycle and of the background loops find files by index, never by reading
every file of a kind (a cost that would grow with every upload the gateway ever took)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from airlock.context import Gateway
from airlock.db import schema

from .helpers import Api, job


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'airlock.db'}"  # the plans asked of are SQLite's


def _plans(db: str, statements: list[str]) -> dict[str, list[str]]:
    conn = sqlite3.connect(db)
    try:
        return {
            sql: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in dict.fromkeys(statements)
        }
    finally:
        conn.close()


def _traced(gw: Gateway) -> list[str]:
    """Every statement (with its values inlined) that the gateway's SQLite connections run from now on."""
    seen: list[str] = []
    gw.engine.dispose()  # connections made from here on carry the trace

    @event.listens_for(gw.engine, "connect")
    def _trace(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.set_trace_callback(seen.append)

    return seen


def test_cycle_and_loops_look_files_up_by_index(api: Api, tmp_path: Path) -> None:
    # enough files that a scan and an index lookup differ in the plan, whatever SQLite's statistics say
    api.submit(*(job(f"j{i}") for i in range(6)))
    v = api.volunteer()
    seen = _traced(api.gw)
    for task in v.work(slots=3):
        v.complete(task, data=b"result %d\n" % task["task_id"])
    api.settle()
    for task in v.work(slots=3):
        v.complete(task, data=b"result %d\n" % task["task_id"])
    api.settle()
    ran = list(seen)
    assert api.count(schema.files, schema.file_kind("trusted")) == 6  # the loops did their work

    on_files = [s for s in ran if " files" in s and not s.lstrip().upper().startswith(("INSERT", "PRAGMA"))]
    assert on_files, "the cycle ran no statement on files: the trace saw nothing"
    plans = _plans(str(tmp_path / "airlock.db"), on_files)
    bad = {
        sql: plan
        for sql, plan in plans.items()
        if any(step.startswith("SCAN files") or step.endswith("ix_files_state (kind=?)") for step in plan)
    }
    assert not bad, "statements reading every file of a kind:\n" + "\n".join(
        f"{sql}\n    -> {plan}" for sql, plan in bad.items()
    )
