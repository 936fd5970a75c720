"""SQLite writers of several gateway processes queue on one lock (flock of `<db>-writer.lock`) instead of
SQLite's sleeping busy handler: a writer waits while another process holds the lock, then goes on."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from airlock.db.engine import make_engine

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
