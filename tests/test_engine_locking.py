"""SQLite writers of several gateway processes queue on one lock (flock of `<db>-writer.lock`) instead of
SQLite's sleeping busy handler: a writer waits while another process holds the lock, then goes on."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from airlock.db.engine import hot_begin, make_engine, run_write

HOLD = """
import sys, time
from sqlalchemy import text
from airlock.db.engine import make_engine
engine = make_engine(sys.argv[1])
with engine.begin() as conn:
    conn.execute(text("INSERT INTO t (who, at) VALUES ('holder', :at)"), {"at": time.time()})
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    released = time.time()
print(released, flush=True)
"""


def test_a_writer_in_another_process_waits_for_the_lock_and_then_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (who TEXT, at REAL)"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url, "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    lock = os.open(tmp_path / "db.sqlite-writer.lock", os.O_RDWR)
    try:  # the other process's write transaction holds the shared writer lock
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(lock)
    with engine.begin() as conn:  # blocks until the other process commits
        waited_until = time.time()
        conn.execute(text("INSERT INTO t (who, at) VALUES ('waiter', :at)"), {"at": waited_until})
    released = float(holder.stdout.readline())
    assert holder.wait(timeout=10) == 0
    assert waited_until >= released  # it really waited for the other process's commit
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT who FROM t ORDER BY at")).scalars().all()
    assert rows == ["holder", "waiter"]
    engine.dispose()


def test_an_event_loop_waits_for_another_process_s_turn_without_blocking(tmp_path: Path) -> None:
    """The hot routes write on the event loop; while another process writes, the loop must go on
    serving other requests (here: a ticker), then write as soon as the other process commits."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (who TEXT, at REAL)"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url, "1.0"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.time())
            await asyncio.sleep(0.01)

    def insert() -> float:
        with hot_begin(engine) as conn:  # the turn is already the group's: no wait on the loop
            at = time.time()
            conn.execute(text("INSERT INTO t (who, at) VALUES ('loop', :at)"), {"at": at})
        return at

    async def write() -> float:
        return await run_write(engine, insert)

    async def main() -> float:
        tick = asyncio.create_task(ticker())
        try:
            return await write()
        finally:
            tick.cancel()

    wrote_at = asyncio.run(main())
    released = float(holder.stdout.readline())
    assert holder.wait(timeout=10) == 0
    assert wrote_at >= released  # it waited for the other process's commit
    during = [t for t in ticks if t < released]
    assert len(during) >= 20, f"the event loop was blocked while it waited: {len(during)} ticks in 1 s"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT who FROM t ORDER BY at")).scalars().all() == ["holder", "loop"]
    engine.dispose()


def test_a_groups_turn_is_held_while_its_functions_run_and_given_back_at_its_commit(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    lock_file = tmp_path / "db.sqlite-writer.lock"

    def other_process_can_lock() -> bool:
        fd = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    seen: list[bool] = []

    def insert() -> None:
        seen.append(other_process_can_lock())  # the group's transaction holds the turn
        with hot_begin(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))

    def refuse() -> None:
        seen.append(other_process_can_lock())
        raise ValueError("refused")

    async def main() -> None:
        await run_write(engine, insert)
        assert other_process_can_lock()  # released at the commit, before the caller goes on
        with pytest.raises(ValueError):
            await run_write(engine, refuse)
        assert other_process_can_lock()  # a group whose only function failed gives the turn back too

    asyncio.run(main())
    assert seen == [False, False]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    engine.dispose()
