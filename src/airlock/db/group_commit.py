"""Group commit: the hot write transactions that one event loop runs close together share one COMMIT.

On SQLite every commit appends each page it changed to the WAL: a scheduler RPC changes some twenty
pages (the task and job rows, their state indexes, the audit events, the host), and the commit is about a
tenth of the RPC's CPU. Requests that arrive together change many of the same pages (the tail of the
events table, the index leaves of the ready and leased tasks), so one commit for all of them writes each
page once and costs far less than one commit each.

How it runs, on one event loop (`WriterGate.turn(..., group=True)` in `airlock.db.engine`):

* the first coroutine to ask for the writer turn leads a group: it lets a few turns of the loop go by
  while others join (it does not hold the turn yet), then takes the turn, closes the group to newcomers,
  begins the write transaction and runs its own block;
* coroutines that asked while the group was open are its members: each runs its block inside a
  SAVEPOINT of the group's transaction (`hot_begin` sees the group), so a block that fails is rolled
  back alone; those that ask once it is closed lead the next group, which gathers meanwhile;
* once every member has run its block, the leader commits once and gives the turn back;
* every member leaves its `async with` only after that commit: no reply goes out for work that is not
  yet durable, exactly as with a commit of its own. If the commit fails, every member gets the error.

A crash before the commit loses the group's work, and none of it was answered: the clients send again.

The turn is held only from the moment the members run their blocks to the commit, not while the group
gathers: the loop's other work (parsing requests, checking tokens, sending replies) then runs beside
another process's write instead of behind it, and the background loops' writes find the turn free more
often.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Connection

from airlock.db.fast import SavepointLost, savepoint

MAX_MEMBERS = 128  # one group's members at most: bounds how long one transaction holds the writer turn
MAX_ROUNDS = 16  # turns of the event loop a group gathers members at most
IDLE_ROUNDS = 2  # a group stops gathering after this many turns of the loop in which nobody joined

_CURRENT: ContextVar[CommitGroup | None] = ContextVar("airlock_commit_group", default=None)


class NestedWriteError(sqlite3.OperationalError):
    """A write transaction begun on a connection of its own inside a grouped one: it could only wait
    for a turn that the group holds. Write inside `hot_begin` instead."""


Opener = Callable[[], tuple[Connection, Callable[[Connection, bool], None]]]


class CommitGroup:
    """One group of hot write transactions of one event loop, committed together (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: object) -> None:
        self.owner = owner  # the WriterGate (one per database) whose turn the group holds
        self.ready: asyncio.Future[None] = loop.create_future()  # the leader holds the turn
        self.committed: asyncio.Future[None] = loop.create_future()
        self.open = True  # members may still join
        self.members = 1  # the leader included
        self.running = 0  # members (not the leader) that joined and have not left their block yet
        self.depth = 0  # savepoints open right now
        self.error: BaseException | None = None  # the commit's, once it failed
        self._conn: Connection | None = None
        self._release: Callable[[Connection, bool], None] | None = None
        self._broken: BaseException | None = None

    # ------------------------------------------------------------------------------------ the leader
    def begin(self, opener: Opener) -> None:
        """Begin the group's write transaction (the leader, once it holds the writer turn)."""
        conn, release = opener()
        try:
            conn.begin()
        except BaseException:
            release(conn, True)
            raise
        self._conn, self._release = conn, release

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None

    async def gather(self) -> None:
        """Let members join for a few turns of the loop (the leader, before it asks for the turn)."""
        rounds = idle = 0
        seen = self.members
        while self.open and rounds < MAX_ROUNDS and idle < IDLE_ROUNDS and self.members < MAX_MEMBERS:
            await asyncio.sleep(0)
            rounds += 1
            idle = idle + 1 if self.members == seen else 0
            seen = self.members

    def close(self) -> None:
        """No newcomers (they lead the next group); the members so far stay (the leader, at its turn)."""
        self.open = False

    async def collect(self) -> None:
        """Wait until every member has run its block (the leader, after its own block)."""
        while self.running and self.in_transaction:
            await asyncio.sleep(0)

    def finish(self) -> None:
        """Close the group and commit its transaction (once); members waiting on `committed` learn the
        outcome, and `error` holds the commit's error, if any."""
        self.open = False
        if self.committed.done():
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            assert self._release is not None
            try:
                if self._broken is not None:
                    raise self._broken
                conn.commit()
            except BaseException as exc:
                self.error = exc
                with contextlib.suppress(Exception):
                    conn.rollback()
            finally:
                self._release(conn, self.error is not None)
        if self.error is None:
            self.committed.set_result(None)
        else:
            failure = self.error if isinstance(self.error, Exception) else RuntimeError(str(self.error))
            self.committed.set_exception(failure)
            self.committed.exception()  # retrieved here: members that already left need not see it

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

    def enter(self) -> Any:
        """Make this group the current task's (its `hot_begin` then joins it); returns the reset token."""
        return _CURRENT.set(self)

    @staticmethod
    def leave(token: Any) -> None:
        _CURRENT.reset(token)


def current_group() -> CommitGroup | None:
    """The group whose block the running code is in, if it still has its transaction open."""
    group = _CURRENT.get()
    return group if group is not None and group.in_transaction else None
