"""Group commit: the hot write transactions that one event loop runs close together share one COMMIT.

On SQLite every commit appends each page it changed to the WAL: a scheduler RPC changes some twenty
pages (the task and job rows, their state indexes, the audit events, the host), and the commit is about a
tenth of the RPC's CPU. Requests that arrive together change many of the same pages (the tail of the
events table, the index leaves of the ready and leased tasks), so one commit for all of them writes each
page once and costs far less than one commit each.

How it runs, on one event loop (`WriterGate.grouped` in `airlock.db.engine`, called by `run_write`):

* a request's write is a plain function (its `hot_begin` transaction); the first request to hand one in
  opens a group, and a task of the group's own, its runner, lets a few turns of the loop go by while
  others hand theirs in (it does not hold the turn yet);
* the runner then takes the turn (waiting in a helper thread if another process holds it), closes the
  group to newcomers, begins the write transaction and calls the members' functions one after the other,
  each inside a SAVEPOINT of the group's transaction (`hot_begin` sees the group), so a function that
  fails is rolled back alone; requests that hand theirs in once it is closed open the next group;
* it commits once and gives the turn back, and only then does each request learn its function's
  result: no reply goes out for work that is not yet durable, exactly as with a commit of its own. If
  the commit fails, every member gets the error.

The functions run back to back, nothing else of the loop between them: the turn is held for the writes
alone, not for the loop's other work (parsing requests, checking tokens, sending replies), which runs
beside another process's write instead of holding it up. (When the members ran their blocks as
coroutines of their own, the loop served other requests between them and a turn was held about five
times as long as its writes took: two serving processes took turns rather than working side by side.)

A crash before the commit loses the group's work, and none of it was answered: the clients send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection

from airlock.db.fast import SavepointLost, savepoint

MAX_MEMBERS = 128  # one group's members at most: bounds how long one transaction holds the writer turn
MAX_ROUNDS = 16  # turns of the event loop a group gathers members at most
IDLE_ROUNDS = 2  # a group stops gathering after this many turns of the loop in which nobody joined

T = TypeVar("T")
_CURRENT: ContextVar[CommitGroup | None] = ContextVar("airlock_commit_group", default=None)


class NestedWriteError(sqlite3.OperationalError):
    """A write transaction begun on a connection of its own inside a grouped one: it could only wait
    for a turn that the group holds. Write inside `hot_begin` instead."""


Opener = Callable[[], tuple[Connection, Callable[[Connection, bool], None]]]


@dataclass(eq=False)
class _Member:
    work: Callable[[], Any]
    context: contextvars.Context  # the caller's, in which its function runs
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


class CommitGroup:
    """One group of hot write transactions of one event loop, committed together (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: object) -> None:
        self.owner = owner  # the WriterGate (one per database) whose turn the group holds
        self.loop = loop
        self.open = True  # members may still join
        self.depth = 0  # savepoints open right now
        self.error: BaseException | None = None  # the commit's, once it failed
        self.runner: asyncio.Task[None] | None = None  # the task that runs the group (kept referenced)
        self._members: list[_Member] = []
        self._conn: Connection | None = None
        self._broken: BaseException | None = None

    @property
    def size(self) -> int:
        return len(self._members)

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None

    def add(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Hand in a member's function (the group must be open); its future gets the function's result
        once the group has committed, or the function's own error, or the commit's."""
        assert self.open, "the group is closed"
        future: asyncio.Future[T] = self.loop.create_future()
        self._members.append(_Member(work, contextvars.copy_context(), future))
        return future

    async def gather(self) -> None:
        """Let members join for a few turns of the loop (the runner, before it asks for the turn)."""
        rounds = idle = 0
        seen = self.size
        while self.open and rounds < MAX_ROUNDS and idle < IDLE_ROUNDS and self.size < MAX_MEMBERS:
            await asyncio.sleep(0)
            rounds += 1
            idle = idle + 1 if self.size == seen else 0
            seen = self.size

    # ------------------------------------------------------------------------------------ the runner
    def run(self, opener: Opener) -> None:
        """Begin the group's transaction, call every member's function in it, commit, and let the
        members know (the runner, holding the writer turn; synchronous from begin to commit). Closes the
        group first: requests that hand in their functions from here on open the next one."""
        self.open = False
        interrupt: BaseException | None = None
        conn, release = opener()
        try:
            conn.begin()
        except BaseException:
            release(conn, True)
            raise
        self._conn = conn
        try:
            for member in self._members:
                if member.future.cancelled():  # its request went away before its turn: not run
                    continue
                try:
                    member.result = member.context.run(self._call, member.work)
                except BaseException as exc:  # rolled back to its savepoint: the others go on
                    member.error = exc
                    if not isinstance(exc, Exception):
                        interrupt = exc
                        break
                if self._broken is not None:
                    break
            if interrupt is not None:
                raise interrupt
            if self._broken is not None:
                raise self._broken
            conn.commit()
        except BaseException as exc:
            self.error = exc
            with contextlib.suppress(Exception):
                conn.rollback()
        finally:
            self._conn = None
            release(conn, self.error is not None)
            self._resolve()
        if interrupt is not None:
            raise interrupt

    def _call(self, work: Callable[[], T]) -> T:
        token = _CURRENT.set(self)
        try:
            return work()
        finally:
            _CURRENT.reset(token)

    def _resolve(self) -> None:
        for member in self._members:
            if member.future.done():
                continue
            error = member.error if member.error is not None else self.error
            if error is None:
                member.future.set_result(member.result)
            else:
                member.future.set_exception(
                    error if isinstance(error, Exception) else RuntimeError(f"interrupted: {error!r}")
                )

    def fail(self, error: BaseException) -> None:
        """The group could not run (no writer turn): every member that is still waiting gets the error."""
        self.open = False
        if self.error is None:
            self.error = error
        self._resolve()

    # ------------------------------------------------------------------------------------ the members
    @contextlib.contextmanager
    def member_transaction(self) -> Iterator[Connection]:
        """One member's transaction: a SAVEPOINT of the group's, released on success, rolled back to on
        failure (then nothing of this member is in the group's commit)."""
        conn = self._conn
        assert conn is not None, "the group has no transaction"
        self.depth += 1
        try:
            with savepoint(conn):
                yield conn
        except SavepointLost as lost:  # the connection is unusable: the whole group must fail
            self._broken = lost
            raise
        finally:
            self.depth -= 1


def current_group() -> CommitGroup | None:
    """The group whose block the running code is in, if it still has its transaction open."""
    group = _CURRENT.get()
    return group if group is not None and group.in_transaction else None
