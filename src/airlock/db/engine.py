"""Engine creation: SQLite in WAL mode with write transactions that lock at BEGIN, or PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import QueuePool

READ_ONLY = "airlock_read_only"
WRITE_LOCK_TIMEOUT_S = 30.0
CHECKPOINT_INTERVAL_S = 0.5
# Backstop only: the checkpointer thread keeps the WAL far below this many pages.
WAL_AUTOCHECKPOINT_PAGES = 8000


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


class _WriterConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions queue on a lock before SQLite's own.

    SQLite admits one writer; connections that collide on its lock are put to sleep by the busy handler
    in steps of up to 100 ms, which ruins latency and leaves CPUs idle under load. So writers queue first
    on an in-process lock and then on an exclusive flock(2) of `<database>-writer.lock`, shared by every
    gateway process on this database: the kernel hands that lock over the moment it is released. The busy
    handler is left for anything else that writes to the file.
    """

    write_lock: threading.Lock  # set per engine on a subclass
    holds_lock = False

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        path = os.fsdecode(database)
        memory = path == ":memory:" or path.startswith("file:") or not path
        # This connection's own open file of the lock (flock locks belong to an open file, and the
        # in-process queue above makes sure two connections of this process never wait on each other).
        self.lock_fd: int | None = (
            None if memory else os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        )

    def begin_write(self) -> None:
        if not self.write_lock.acquire(timeout=WRITE_LOCK_TIMEOUT_S):
            raise sqlite3.OperationalError("database is locked (waited for the in-process writer queue)")
        self.holds_lock = True
        try:
            if self.lock_fd is not None:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX)  # releases the GIL while it waits
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.holds_lock:
            self.holds_lock = False
            try:
                if self.lock_fd is not None:
                    fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            finally:
                self.write_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None


class _Checkpointer(threading.Thread):
    """Copies the WAL into the database file twice a second, off the request path.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold, under the write
    lock: that commit then waits for an fsync of the database file (measured here: median commit 71 µs,
    99th percentile 4.9 ms), and every other writer waits behind it. A PASSIVE checkpoint from this
    thread, on its own connection, never blocks a reader or a writer; the automatic one stays as a
    backstop at a much higher threshold. Stops when the engine is disposed."""

    def __init__(self, path: str) -> None:
        super().__init__(name="airlock-wal-checkpoint", daemon=True)
        self.path = path
        self.stopped = threading.Event()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self.stopped.wait(CHECKPOINT_INTERVAL_S):
                if not os.path.exists(self.path):
                    return
                if conn is None:
                    conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            if conn is not None:
                conn.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        factory = type(
            "WriterConnection",
            (_WriterConnection,),
            {"write_lock": threading.Lock()},
        )
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "factory": factory},
            poolclass=QueuePool,
            pool_size=8,
            max_overflow=32,
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide where transactions begin (the documented recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers take the write lock at BEGIN, so no transaction has to upgrade a read lock and
            # fail; readers (see `read`) take none and run beside the writer (WAL).
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.connection.driver_connection.begin_write()  # type: ignore[union-attr]

        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            checkpointer = _Checkpointer(os.path.abspath(database))
            checkpointer.start()

            @event.listens_for(engine, "engine_disposed")
            def _stop(_engine: Engine) -> None:
                checkpointer.stopped.set()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True, **kwargs)


@contextlib.contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A read-only snapshot: never blocks writers, never takes SQLite's write lock. Rolled back at the end."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        try:
            yield conn
        finally:
            conn.rollback()
