"""PostgreSQL connections: a process's pool opens `database_connections` at most; its threads keep only
part of them (all but `FREE_CONNECTIONS`, or half), the rest stays for everyone else; and `airlock serve`
refuses to start when its processes together could open more than the server admits (it would otherwise
fail under load with "too many clients")."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import select

from airlock.db import engine as db_engine
from airlock.db.budget import ConnectionBudgetExceeded, check_connection_budget, server_limit
from airlock.db.engine import hot_begin, hot_read, make_engine

from .conftest import fresh_pg_database
from .helpers import OPERATOR_TOKEN

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(pg_admin: Any) -> Iterator[str]:
    yield from fresh_pg_database(pg_admin)


def test_the_pool_opens_database_connections_at_most(pg_url: str) -> None:
    engine = make_engine(pg_url, connections=5, pool_timeout=0.5)
    try:
        held = [engine.connect() for _ in range(5)]
        with pytest.raises(sqlalchemy.exc.TimeoutError):
            engine.connect()
        held.pop().close()
        engine.connect().close()  # one given back: the next caller gets it
        for conn in held:
            conn.close()
    finally:
        engine.dispose()


def test_threads_keep_part_of_the_pool_and_leave_the_rest_to_others(pg_url: str) -> None:
    engine = make_engine(pg_url, connections=6, pool_timeout=2)
    alive = threading.Event()
    ready = threading.Barrier(6)

    def work() -> None:
        with hot_begin(engine) as conn:
            conn.execute(select(1)).all()
        with hot_read(engine) as conn:
            conn.execute(select(1)).all()
        ready.wait()
        alive.wait(10)  # stay alive: an ended thread's place would go to the next

    threads = [threading.Thread(target=work) for _ in range(5)]
    try:
        for t in threads:
            t.start()
        ready.wait(10)
        pins, _ = db_engine._pinned(engine, read_only=False)
        assert len(pins.conns) == 3  # 5 threads would keep 10: half of the 6 at most
        held = [engine.connect() for _ in range(3)]  # the rest of the pool is there for everyone else
        for conn in held:
            assert conn.execute(select(1)).scalar_one() == 1
            conn.close()
    finally:
        alive.set()
        for t in threads:
            t.join()
        engine.dispose()


def test_the_budget_is_checked_against_the_servers_max_connections(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        total, reserved = server_limit(engine)
        available = total - reserved
        fits = available // 2  # one worker and the loops' process
        assert check_connection_budget(engine, workers=1, per_process=fits) == 2 * fits
        with pytest.raises(ConnectionBudgetExceeded) as exc:
            check_connection_budget(engine, workers=1, per_process=fits + 1)
        message = exc.value.message
        assert f"may open {fits + 1} PostgreSQL connections each" in message
        assert f"max_connections {total}" in message and f"database_connections to {fits} or less" in message
        # SQLite has no such limit
        sqlite = make_engine("sqlite://")
        assert check_connection_budget(sqlite, workers=64, per_process=10**6) == 0
        sqlite.dispose()
    finally:
        engine.dispose()


def test_serve_refuses_to_start_over_budget_and_says_what_to_change(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    total, reserved = server_limit(engine)
    engine.dispose()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    env = {
        **base,
        "AIRLOCK_DATA_DIR": str(tmp_path / "data"),
        "AIRLOCK_DATABASE_URL": pg_url,
        "AIRLOCK_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "AIRLOCK_WORKERS": "3",
        "AIRLOCK_DATABASE_CONNECTIONS": str((total - reserved) // 4 + 1),
        "AIRLOCK_BIND_PORT": "1",  # never reached: it would fail to bind
    }
    run = subprocess.run(
        [sys.executable, "-m", "airlock", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 1, out
    assert "4 gateway processes (3 worker(s) and the background loops)" in out
    assert "AIRLOCK_DATABASE_CONNECTIONS" in out
