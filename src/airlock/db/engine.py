"""Engine creation: SQLite in WAL mode with write transactions that lock at BEGIN, or PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.to_thread
import orjson
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.pool import QueuePool

from airlock.db.group_commit import MAX_MEMBERS, CommitGroup, NestedWriteError, Opener, current_group

READ_ONLY = "airlock_read_only"
WRITE_LOCK_TIMEOUT_S = 30.0
CHECKPOINT_INTERVAL_S = 0.5
# Backstop only: the checkpointer thread keeps the WAL far below this many pages.
WAL_AUTOCHECKPOINT_PAGES = 8000
MMAP_BYTES = 1 << 30
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


class WriterGate:
    """The turn to write to one SQLite database, for every connection and thread of this process, and
    across processes.

    SQLite admits one writer; connections that collide on its lock are put to sleep by the busy handler
    in steps of up to 100 ms, which ruins latency and leaves CPUs idle under load. So writers queue here
    first: inside the process on a condition, then on an exclusive flock(2) of `<database>-writer.lock`,
    shared by every gateway process on this database, which the kernel hands over the moment it is
    released. The busy handler is left for anything else that writes to the file.

    An event loop must not wait for another process's turn: that stops every request it is serving.
    `grouped()` (what `run_write` calls) lets it wait in a helper thread instead: the turn is then
    reserved for the loop's thread, and the next write transaction begun on that thread uses it
    (`begin()` on the loop thread takes a held reservation rather than waiting, so it can never wait for
    a turn that only it could use). It also groups the loop's hot transactions into one commit
    (`airlock.db.group_commit`): the group gathers its members before it asks for the turn, and its
    transaction holds the turn while their functions run, back to back. A write transaction of its own
    begun inside one of them is refused (`NestedWriteError`).
    """

    def __init__(self, path: str | None) -> None:
        self._cond = threading.Condition()
        self._state = "free"  # free | locking (someone waits for the flock) | held | reserved
        self._for: int | None = None  # the thread the turn is held or reserved for
        self._path = path
        self._fd: int | None = None  # opened by the first writer, closed when the engine is disposed
        self._waiter: concurrent.futures.ThreadPoolExecutor | None = None
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CommitGroup] = (
            weakref.WeakKeyDictionary()
        )
        self.active: CommitGroup | None = None  # the group whose transaction holds the turn

    def begin(self, timeout: float = WRITE_LOCK_TIMEOUT_S) -> None:
        """Take the turn for the calling thread (blocking)."""
        me = threading.get_ident()
        if self.active is not None and self._state == "held" and self._for == me:
            # a member's function, called by the group's runner on this thread: the turn is the group's
            raise NestedWriteError(
                "a write transaction of its own inside a grouped one (write through hot_begin)"
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._state == "reserved" and self._for == me:
                    self._state = "held"
                    return
                if self._state == "free":
                    self._state, self._for = "locking", me
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise sqlite3.OperationalError("database is locked (waited for this process's writers)")
                self._cond.wait(left)
        self._flock("held", me, blocking=True)

    def end(self) -> None:
        """Give the turn back (at commit or rollback)."""
        with self._cond:
            if self._state != "held":
                return
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._state, self._for = "free", None
            self._cond.notify_all()

    def _flock(self, state: str, owner: int, *, blocking: bool) -> bool:
        """With the in-process turn taken ("locking"), take the flock; the turn becomes `state`."""
        try:
            if self._path is not None:
                if self._fd is None:  # only the one thread in "locking" gets here
                    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                    self._fd = os.open(f"{self._path}-writer.lock", flags, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException as exc:  # the flock is taken (non-blocking) or failed: the turn is free again
            with self._cond:
                self._state, self._for = "free", None
                self._cond.notify_all()
            if isinstance(exc, BlockingIOError):
                return False
            raise
        with self._cond:
            self._state, self._for = state, owner
            self._cond.notify_all()
        return True

    def _try_reserve(self, owner: int) -> bool:
        with self._cond:
            if self._state == "reserved" and self._for == owner:
                return True
            if self._state != "free":
                return False
            self._state, self._for = "locking", owner
        return self._flock("reserved", owner, blocking=False)

    def _reserve_blocking(self, owner: int) -> None:
        with self._cond:
            while not (self._state == "free" or (self._state == "reserved" and self._for == owner)):
                self._cond.wait()
            if self._state == "reserved":
                return
            self._state, self._for = "locking", owner
        self._flock("reserved", owner, blocking=True)

    async def grouped(self, opener: Opener, work: Callable[[], T]) -> T:
        """Run `work` (a hot write transaction, `hot_begin`) on the event loop's thread in the loop's
        commit group (`airlock.db.group_commit`), with those handed in close to it: one transaction and
        one commit for all. Returns once it is committed. `opener` gives a group its connection."""
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is not None and group.open and group.size < MAX_MEMBERS:
            return await group.add(work)
        group = self._groups[loop] = CommitGroup(loop, self)
        result = group.add(work)
        queue = self._queue(loop)
        try:
            await queue.acquire()  # the loop's turns in the order asked (at once when none is queued)
        except BaseException:  # cancelled: this one's work is not run, the group's runner queues itself
            result.cancel()
            group.runner = loop.create_task(self._run_group(loop, group, opener, queued=False))
            raise
        group.runner = loop.create_task(self._run_group(loop, group, opener, queued=True))
        return await result

    async def _run_group(
        self, loop: asyncio.AbstractEventLoop, group: CommitGroup, opener: Opener, *, queued: bool
    ) -> None:
        """A group's runner (its place in the loop's queue taken already, when `queued`): gather members
        while the turn is still free for others, take the turn, then call them all and commit, with no
        await in between (the turn is held for the writes alone)."""
        queue = self._queue(loop)
        try:
            if not queued:
                await queue.acquire()
            try:
                await group.gather()
                if self._try_reserve(threading.get_ident()):
                    self._run_reserved(group, opener)
                else:
                    await self._run_when_reserved(loop, group, opener)
            finally:
                queue.release()
        except BaseException as exc:
            group.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._groups.get(loop) is group:
                del self._groups[loop]

    def _run_reserved(self, group: CommitGroup, opener: Opener) -> None:
        """Run a group with the turn reserved for this thread (its transaction begins with the
        reservation, so it holds the turn), then give the turn back."""
        try:
            self.active = group
            group.run(opener)
        finally:
            self.active = None
            self.unreserve()

    def _queue(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = asyncio.Lock()
        return queue

    async def _run_when_reserved(
        self, loop: asyncio.AbstractEventLoop, group: CommitGroup, opener: Opener
    ) -> None:
        """Wait for the turn in a helper thread, which reserves it for the loop's thread and schedules
        the group's run as a callback of the loop: the group runs the moment the loop gets to it. (Woken
        through a future, its runner's task would resume only after the loop had gone round its ready
        callbacks three more times, each a pass over the requests that came in meanwhile, while the turn,
        reserved, stood idle and the other processes waited for it.)"""
        me = threading.get_ident()
        ran: asyncio.Future[None] = loop.create_future()

        def run() -> None:  # on the loop's thread, the turn reserved for it
            if ran.done():  # the runner gave up waiting (cancelled): nobody uses the turn
                self.unreserve()
                return
            try:
                self._run_reserved(group, opener)
            except BaseException as exc:
                ran.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            ran.set_result(None)

        def failed(exc: BaseException) -> None:
            if not ran.done():
                ran.set_exception(exc)

        def wait() -> None:  # in the helper thread
            try:
                self._reserve_blocking(me)
            except BaseException as exc:
                loop.call_soon_threadsafe(failed, exc)
                return
            try:
                loop.call_soon_threadsafe(run)
            except RuntimeError:  # the loop is closed: nobody will use the turn
                self.unreserve(owner=me)

        if self._waiter is None:
            self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="airlock-turn")
        self._waiter.submit(wait)
        await ran

    def unreserve(self, owner: int | None = None) -> None:
        """Give back a reservation of the calling thread (or of `owner`) that no transaction used."""
        with self._cond:
            if self._state != "reserved" or self._for != (owner or threading.get_ident()):
                return
            self._state = "held"
        self.end()

    def close(self) -> None:
        """Close the lock file while nobody holds the turn (a later writer opens it again)."""
        with self._cond:
            if self._state == "free" and self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
            self._waiter = None


class _WriterConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions take the engine's `WriterGate` before SQLite's lock."""

    gate: WriterGate  # set per engine on a subclass
    holds_turn = False

    def begin_write(self) -> None:
        self.gate.begin()
        self.holds_turn = True
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.holds_turn:
            self.holds_turn = False
            self.gate.end()

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


_gates: weakref.WeakKeyDictionary[Engine, WriterGate] = weakref.WeakKeyDictionary()


def writer_gate(engine: Engine) -> WriterGate | None:
    """The engine's writer gate (SQLite), or None (PostgreSQL: writers do not queue)."""
    return _gates.get(engine)


HOT_THREADS = 8  # PostgreSQL: hot transactions in worker threads at once, beside the default limiter's
_hot_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


def _hot_limiter() -> anyio.CapacityLimiter:
    """The running loop's limiter for hot transactions in threads (PostgreSQL). Their own, not anyio's
    default one: that is shared with password hashing (logins, registrations), certificate checks and
    file responses, and a burst of logins holding all of its tokens for tens of milliseconds each would
    queue every work request and report behind them."""
    loop = asyncio.get_running_loop()
    limiter = _hot_limiters.get(loop)
    if limiter is None:
        limiter = _hot_limiters[loop] = anyio.CapacityLimiter(HOT_THREADS)
    return limiter


async def run_write(engine: Engine, work: Callable[[], T]) -> T:
    """Run `work`, a request's one short write transaction (`hot_begin`), where it costs least.

    On SQLite: on the event loop, in the writer turn and the loop's commit group (`WriterGate.grouped`); its
    statements take microseconds, less than a hand-off to a thread. On PostgreSQL: in a worker thread.
    There each statement is a round trip to the server and each commit waits for the server's WAL
    flush; run on the event loop, every request would wait for all the others' (measured: 60 full
    cycles a second, the loop idle in the driver's wait), while in threads they overlap, and the server
    flushes concurrent commits together. The threads are bounded by a limiter of their own
    (`HOT_THREADS`), so slow work in the default thread pool never holds up a request's transaction."""
    gate = writer_gate(engine)
    if gate is None:
        return await anyio.to_thread.run_sync(work, limiter=_hot_limiter())
    return await gate.grouped(_group_opener(engine), work)


async def run_read(engine: Engine, work: Callable[[], T]) -> T:
    """Run `work`, a request's short read (`hot_read`): on the event loop on SQLite, in a worker thread
    on PostgreSQL (see `run_write`)."""
    if writer_gate(engine) is None:
        return await anyio.to_thread.run_sync(work, limiter=_hot_limiter())
    return work()


def _group_opener(engine: Engine) -> Opener:
    """How a commit group gets its connection: the loop thread's kept one when free, else a pooled one."""

    def open_connection() -> tuple[Connection, Callable[[Connection, bool], None]]:
        pins, conn = _pinned(engine, read_only=False)
        if conn is None:
            return engine.connect(), lambda pooled, _failed: pooled.close()

        def release(kept: Connection, failed: bool) -> None:
            if failed:
                _drop_if_spoilt(pins, kept)

        return conn, release

    return open_connection


DEFAULT_CONNECTIONS = 24  # PostgreSQL: a process's pool at most (Settings.database_connections)
FREE_CONNECTIONS = 8  # of them never kept by threads (hot_begin): the default thread pool's worth


def json_dumps(value: Any) -> str:
    """How JSON columns are written: orjson, about five times faster than the standard library for the
    small documents a hot request writes (its audit events' details, a report's outputs), compact, and
    with non-string keys written as strings as `json.dumps` does. (A job's parameters are refused at
    submission if they hold a number JSON cannot: orjson would write null.)"""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: str, *, connections: int = DEFAULT_CONNECTIONS, **kwargs: Any) -> Engine:
    """The engine of `url`. On PostgreSQL its pool opens `connections` at most (`airlock.db.budget`
    checks what all the gateway's processes may open together against the server). JSON columns are
    written with `json_dumps` and read with orjson."""
    kwargs = {"json_serializer": json_dumps, "json_deserializer": orjson.loads, **kwargs}
    if url.startswith("sqlite"):
        database = make_url(url).database or ""
        file_db = database not in ("", ":memory:") and not database.startswith("file:")
        gate = WriterGate(os.path.abspath(database) if file_db else None)
        factory = type("WriterConnection", (_WriterConnection,), {"gate": gate})
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "factory": factory},
            poolclass=QueuePool,
            pool_size=8,
            max_overflow=32,
            pool_use_lifo=True,  # the connection used last has the warmest page cache
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
            # Pages read through a shared mapping: when another connection or process has written,
            # SQLite drops this connection's page cache, and reading it back from the mapping costs
            # no system call and no copy.
            cur.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers take the write lock at BEGIN, so no transaction has to upgrade a read lock and
            # fail; readers (see `read`) take none and run beside the writer (WAL).
            if conn.get_execution_options().get(READ_ONLY):
                # on the driver directly: SQLAlchemy's execution path costs ~50 µs for this statement
                conn.connection.driver_connection.execute("BEGIN")  # type: ignore[union-attr]
            else:
                conn.connection.driver_connection.begin_write()  # type: ignore[union-attr]

        _gates[engine] = gate
        checkpointer = _Checkpointer(os.path.abspath(database)) if file_db else None
        if checkpointer is not None:
            checkpointer.start()

        @event.listens_for(engine, "engine_disposed")
        def _stop(_engine: Engine) -> None:
            gate.close()
            if checkpointer is not None:
                checkpointer.stopped.set()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # No overflow: an overflow connection is closed when it is given back while the pool is over its
    # size, and with threads keeping connections (hot_begin) that is every other checkout, each a new
    # server process to fork and authenticate. The pool opens its connections as they are first needed.
    engine = create_engine(url, pool_size=connections, max_overflow=0, pool_pre_ping=True, **kwargs)
    _kept_limits[engine] = max(connections - FREE_CONNECTIONS, connections // 2)
    return engine


@contextlib.contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A read-only snapshot: never blocks writers, never takes SQLite's write lock. Rolled back at the end."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        try:
            yield conn
        finally:
            conn.rollback()


# ------------------------------------------------------------------------------- pinned connections
MAX_PINNED_THREADS = 12  # the event loop's, the request thread pool's (api.app.THREADS) and a few more
_kept_limits: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()  # set by make_engine


class _Pins:
    """The connections that a few threads of one engine keep between their hot transactions. A thread
    pool's workers come and go (anyio ends one idle for 10 s): the connections of a thread that has ended
    are given back when a new thread needs its place, so the places never fill up with dead threads."""

    def __init__(self, engine: Engine) -> None:
        self.lock = threading.Lock()
        self.conns: dict[tuple[int, bool], Connection] = {}
        # Kept connections are checked out of the pool for good: `make_engine` leaves part of the pool
        # to transactions that get none (a thread past the places, a nested call, the cold routes).
        self.limit = _kept_limits.get(engine, 2 * MAX_PINNED_THREADS)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    def take(self, engine: Engine, read_only: bool) -> Connection | None:
        # One for reads and one for writes: SQLite begins them differently (see `make_engine`), and on
        # PostgreSQL one connection serving both cost its server process a quarter more CPU a cycle.
        key = (threading.get_ident(), read_only)
        conn = self.conns.get(key)
        if conn is not None and not conn.closed and not conn.invalidated:
            return None if conn.in_transaction() else conn  # in use (a nested call): not pinned
        with self.lock:
            if conn is None and self._full():
                self._forget_ended_threads()
                if self._full():
                    return None
            conn = engine.connect()
            if read_only:
                conn.execution_options(**{READ_ONLY: True})
            self.conns[key] = conn
        return conn

    def _full(self) -> bool:
        return len(self.conns) >= self.limit or len({t for t, _ in self.conns}) >= MAX_PINNED_THREADS

    def _forget_ended_threads(self) -> None:
        """Close the kept connections of threads that have ended (called with the lock held). One in a
        transaction stays: its thread may be alive and unknown to `threading` (started from C)."""
        alive = {t.ident for t in threading.enumerate()}
        for key, conn in list(self.conns.items()):
            if key[0] not in alive and not conn.in_transaction():
                del self.conns[key]
                with contextlib.suppress(Exception):
                    conn.close()

    def drop(self, conn: Connection) -> None:
        with self.lock:
            for key, held in list(self.conns.items()):
                if held is conn:
                    del self.conns[key]
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        with self.lock:
            conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


_pins: weakref.WeakKeyDictionary[Engine, _Pins] = weakref.WeakKeyDictionary()
_pins_lock = threading.Lock()


def _pinned(engine: Engine, read_only: bool) -> tuple[_Pins, Connection | None]:
    pins = _pins.get(engine)
    if pins is None:
        with _pins_lock:
            pins = _pins.get(engine)
            if pins is None:
                pins = _pins[engine] = _Pins(engine)
    return pins, pins.take(engine, read_only)


@contextlib.contextmanager
def _kept(pins: _Pins, conn: Connection) -> Iterator[None]:
    """Around a use of a kept connection: one that a failure closed or invalidated is given up."""
    try:
        yield
    except BaseException:
        _drop_if_spoilt(pins, conn)
        raise


def _drop_if_spoilt(pins: _Pins, conn: Connection) -> None:
    """After a failure, give up a kept connection that cannot serve the thread's next transaction: one
    closed or invalidated, or one whose driver is still in a transaction that SQLAlchemy counts as ended
    (SQLite keeps it open after a COMMIT that a deferred constraint refused; the next BEGIN would fail)."""
    try:
        in_transaction = bool(getattr(conn.connection.driver_connection, "in_transaction", False))
    except Exception:
        in_transaction = True
    if conn.invalidated or conn.closed or in_transaction:
        pins.drop(conn)


@contextlib.contextmanager
def hot_begin(engine: Engine) -> Iterator[Connection]:
    """`engine.begin()` for the hot paths: the same one write transaction, on a connection the calling
    thread keeps between transactions instead of taking one from the pool and giving it back each time
    (measured on SQLite: ~50 µs of CPU a transaction against ~115 µs). A nested call, or a thread past
    the first MAX_PINNED_THREADS, gets an ordinary pooled connection. Closed when the engine is disposed."""
    group = current_group()
    if group is not None and group.owner is writer_gate(engine):
        with group.member_transaction() as member:  # a savepoint of the group's transaction
            yield member
        return
    pins, conn = _pinned(engine, read_only=False)
    if conn is None:
        with engine.begin() as pooled:
            yield pooled
        return
    with _kept(pins, conn), conn.begin():
        yield conn


@contextlib.contextmanager
def hot_read(engine: Engine) -> Iterator[Connection]:
    """`read(engine)` on a kept connection, as `hot_begin` is `engine.begin()`."""
    pins, conn = _pinned(engine, read_only=True)
    if conn is None:
        with read(engine) as pooled:
            yield pooled
        return
    with _kept(pins, conn):
        conn.begin()
        try:
            yield conn
        finally:
            conn.rollback()
