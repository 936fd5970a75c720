"""Group commit on SQLite: hot write transactions that one event loop runs together share one COMMIT,
each caller learns its result only once its work is committed, a failing one is rolled back alone, a
failed commit fails every member of the group (and a kept connection whose COMMIT failed is not used
again), and a group's functions run back to back, holding the writer turn for their writes alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import IntegrityError

from airlock.db import engine as db_engine
from airlock.db import group_commit
from airlock.db.engine import hot_begin, make_engine, run_write, writer_gate
from airlock.db.group_commit import NestedWriteError


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
        conn.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
        conn.execute(
            text(
                "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL "
                "REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    engine.dispose()  # the connections made from here on are traced
    yield engine
    engine.dispose()


def commits(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip() == "COMMIT" else None)

    return seen


def committed_rows(engine: Engine, table: str = "t", column: str = "n") -> list[int]:
    """What another connection sees: only committed rows."""
    assert engine.url.database
    conn = sqlite3.connect(engine.url.database)
    try:
        return [n for (n,) in conn.execute(f"SELECT {column} FROM {table} ORDER BY {column}")]
    finally:
        conn.close()


def insert(engine: Engine, n: int) -> None:
    with hot_begin(engine) as conn:
        conn.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})


def test_blocks_asked_together_share_one_commit_and_leave_only_after_it(engine: Engine) -> None:
    seen = commits(engine)
    visible_on_leaving: dict[int, bool] = {}

    async def block(n: int) -> None:
        await run_write(engine, lambda: insert(engine, n))
        visible_on_leaving[n] = n in committed_rows(engine)

    async def main() -> None:
        await asyncio.gather(*(block(n) for n in range(1, 31)))

    asyncio.run(main())
    assert committed_rows(engine) == list(range(1, 31))
    assert all(visible_on_leaving.values()) and len(visible_on_leaving) == 30
    assert 1 <= len(seen) <= 3, f"30 blocks asked together, {len(seen)} commits"


def grouped_outcomes(
    engine: Engine, together: range, then: Callable[[Connection, int], None], later: tuple[int, ...] = ()
) -> dict[int, str]:
    """Blocks that each insert their number in a grouped turn and then run `then`: those of `together`
    asked at once, those of `later` one after the other afterwards. Each one's outcome: "ok" or the name
    of the exception it raised."""
    outcome: dict[int, str] = {}

    def work(n: int) -> None:
        with hot_begin(engine) as conn:
            conn.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})
            then(conn, n)

    async def block(n: int) -> None:
        try:
            await run_write(engine, lambda: work(n))
        except Exception as exc:
            outcome[n] = type(exc).__name__
        else:
            outcome[n] = "ok"

    async def main() -> None:
        await asyncio.gather(*(block(n) for n in together))
        for n in later:
            await block(n)

    asyncio.run(main())
    return outcome


def test_a_failing_block_is_rolled_back_alone(engine: Engine) -> None:
    def refuse_3(_conn: Connection, n: int) -> None:
        if n == 3:
            raise ValueError("refused")

    outcome = grouped_outcomes(engine, range(1, 7), refuse_3)
    assert outcome == {1: "ok", 2: "ok", 3: "ValueError", 4: "ok", 5: "ok", 6: "ok"}
    assert committed_rows(engine) == [1, 2, 4, 5, 6]


def test_a_failed_commit_fails_every_block_of_the_group_and_the_next_group_goes_on(engine: Engine) -> None:
    def orphan_2(conn: Connection, n: int) -> None:
        if n == 2:  # a deferred foreign key: fine at the savepoint, refused at COMMIT
            conn.execute(text("INSERT INTO child (id, parent_id) VALUES (1, 99)"))

    outcome = grouped_outcomes(engine, range(1, 5), orphan_2, later=(10,))  # 10: a later group
    assert outcome == {**dict.fromkeys(range(1, 5), "IntegrityError"), 10: "ok"}
    assert committed_rows(engine) == [10]
    assert committed_rows(engine, "child", "id") == []


def test_a_groups_functions_run_back_to_back_with_nothing_of_the_loop_between_them(engine: Engine) -> None:
    """While a group holds the writer turn, the loop serves nothing else: another coroutine that counts
    the loop's turns sees none go by between the first member's write and the last one's commit."""
    ticks = 0
    seen_at: dict[int, int] = {}
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    def work(n: int) -> None:
        insert(engine, n)
        seen_at[n] = ticks

    async def main() -> None:
        nonlocal running
        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(run_write(engine, lambda n=n: work(n)) for n in range(1, 21)))
        running = False
        await tick

    seen = commits(engine)
    asyncio.run(main())
    assert committed_rows(engine) == list(range(1, 21))
    assert len(seen) == 1, f"20 writes handed in together, {len(seen)} commits"
    assert len(set(seen_at.values())) == 1, f"the loop turned between members: {seen_at}"


def test_the_turn_stays_free_while_a_group_gathers(engine: Engine) -> None:
    """A group asks for the writer turn only once its members have gathered: meanwhile any other writer
    (here one on the loop thread itself; as well another process) writes at once, ahead of the group."""
    rows_seen_by_own: list[int] = []

    async def grouped(n: int) -> None:
        await run_write(engine, lambda: insert(engine, n))

    async def own() -> None:
        await asyncio.sleep(0)  # the group has begun to gather
        gate = writer_gate(engine)
        assert gate is not None and gate.active is None
        with engine.begin() as conn:
            rows_seen_by_own.extend(committed_rows(engine))
            conn.execute(text("INSERT INTO t (n) VALUES (100)"))

    async def main() -> None:
        await asyncio.gather(grouped(1), own(), grouped(2))

    asyncio.run(main())
    assert rows_seen_by_own == []  # nothing of the group was written yet, and nothing waited for it
    assert committed_rows(engine) == [1, 2, 100]


@pytest.mark.parametrize("inside_hot_begin", [True, False], ids=["in-its-savepoint", "beside-it"])
def test_a_write_of_its_own_inside_a_member_is_refused_at_once(
    engine: Engine, inside_hot_begin: bool
) -> None:
    """A member's function that begins a transaction of its own (it could only wait for the turn its
    group holds) fails at once, alone: the group's other members commit."""

    def own_write() -> None:
        with engine.begin() as other:
            other.execute(text("INSERT INTO t (n) VALUES (2)"))

    def nested() -> None:
        if inside_hot_begin:
            with hot_begin(engine) as conn:
                conn.execute(text("INSERT INTO t (n) VALUES (1)"))
                own_write()
        else:
            insert(engine, 1)
            own_write()

    async def main() -> list[object]:
        return await asyncio.gather(
            run_write(engine, lambda: insert(engine, 10)),
            run_write(engine, nested),
            run_write(engine, lambda: insert(engine, 11)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], NestedWriteError)
    # its own savepoint rolled back (in it) or not (beside it: the row went in before the refusal)
    assert committed_rows(engine) == ([10, 11] if inside_hot_begin else [1, 10, 11])
    insert(engine, 3)  # the turn was given back
    assert 3 in committed_rows(engine)


def test_groups_of_one_loop_commit_in_the_order_their_writes_were_handed_in(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full group (MAX_MEMBERS) makes the next writes open another, which waits for the first in the
    loop's queue: writes run and commit in the order they were handed in."""
    monkeypatch.setattr(db_engine, "MAX_MEMBERS", 2)
    monkeypatch.setattr(group_commit, "MAX_MEMBERS", 2)
    seen = commits(engine)
    ran: list[int] = []

    def work(n: int) -> None:
        ran.append(n)
        insert(engine, n)

    async def main() -> None:
        await asyncio.gather(*(run_write(engine, lambda n=n: work(n)) for n in range(1, 6)))

    asyncio.run(main())
    assert ran == [1, 2, 3, 4, 5]
    assert committed_rows(engine) == [1, 2, 3, 4, 5]
    assert len(seen) == 3, f"5 writes in groups of 2 at most, {len(seen)} commits"


def test_a_kept_connection_whose_commit_failed_is_not_used_again(engine: Engine) -> None:
    """SQLite keeps a transaction open after a COMMIT that a deferred constraint refused; the thread's
    kept connection must not carry it into the thread's next transaction."""
    with pytest.raises(IntegrityError), hot_begin(engine) as conn:
        conn.execute(text("INSERT INTO child (id, parent_id) VALUES (1, 99)"))
    insert(engine, 1)
    assert committed_rows(engine) == [1]
    assert committed_rows(engine, "child", "id") == []


def test_a_group_that_waited_for_the_turn_runs_at_the_loop_s_next_pass(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose turn was taken (by another process) waits in a helper thread; once that thread has
    the turn, the group runs in the loop's next pass over its ready callbacks, not after several: meanwhile
    the turn is reserved and idle, and every other process waits for it."""
    gate = writer_gate(engine)
    assert gate is not None
    reserve_blocking = gate._reserve_blocking
    passes = 0
    reserved_at: list[int] = []
    ran_at: list[int] = []

    def taken(owner: int) -> bool:
        return False  # as if another process held the turn: the group waits in the helper thread

    def reserve(owner: int) -> None:
        reserve_blocking(owner)
        reserved_at.append(passes)

    monkeypatch.setattr(gate, "_try_reserve", taken)
    monkeypatch.setattr(gate, "_reserve_blocking", reserve)

    def work(n: int) -> None:
        ran_at.append(passes)
        insert(engine, n)

    async def main() -> None:
        nonlocal passes
        running = True

        async def ticker() -> None:  # one step a pass of the loop over its ready callbacks
            nonlocal passes
            while running:
                passes += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        for n in range(1, 6):
            await run_write(engine, lambda n=n: work(n))
        running = False
        await tick

    asyncio.run(main())
    assert committed_rows(engine) == [1, 2, 3, 4, 5]
    waits = [ran - reserved for reserved, ran in zip(reserved_at, ran_at, strict=True)]
    assert min(waits) <= 2, f"passes of the loop between the reservation and the group's run: {waits}"
