"""Engine creation: SQLite in WAL mode with write transactions that lock at BEGIN, or PostgreSQL."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import QueuePool

READ_ONLY = "airlock_read_only"
WRITE_LOCK_TIMEOUT_S = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


class _WriterConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions queue on an in-process lock.

    SQLite admits one writer; threads that collide on its lock are put to sleep by the busy handler in
    steps of up to 100 ms, which ruins latency under load. Queuing on a Python lock first hands the write
    lock over at once; the busy handler is left to arbitrate between processes only.
    """

    write_lock: threading.Lock  # set per engine on a subclass
    holds_lock = False

    def begin_write(self) -> None:
        if not self.write_lock.acquire(timeout=WRITE_LOCK_TIMEOUT_S):
            raise sqlite3.OperationalError("database is locked (waited for the in-process writer queue)")
        self.holds_lock = True
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.holds_lock:
            self.holds_lock = False
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


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        factory = type("WriterConnection", (_WriterConnection,), {"write_lock": threading.Lock()})
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
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers take the write lock at BEGIN, so no transaction has to upgrade a read lock and
            # fail; readers (see `read`) take none and run beside the writer (WAL).
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.connection.driver_connection.begin_write()  # type: ignore[union-attr]

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
