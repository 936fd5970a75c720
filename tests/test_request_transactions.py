"""Where a request's one transaction runs (`run_write`, `run_read`): on SQLite on the event loop, in the
writer turn; on PostgreSQL in a worker thread, so a transaction waiting on the server (a round trip, a
commit's WAL flush, a row lock) never holds up the other requests the loop is serving."""

from __future__ import annotations

import asyncio
import threading

import anyio.to_thread
import pytest
from sqlalchemy import select, update

from airlock.api.app import THREADS
from airlock.context import Gateway
from airlock.credentials.tokens import Grant, Issued
from airlock.db import schema
from airlock.db.engine import hot_begin, hot_read, is_sqlite, read, run_read, run_write, utcnow

from .helpers import Api, job


def test_sqlite_runs_it_on_the_loop_and_postgresql_in_a_thread(gw: Gateway) -> None:
    async def where() -> tuple[int, int, int]:
        return (
            threading.get_ident(),
            await run_write(gw.engine, threading.get_ident),
            await run_read(gw.engine, threading.get_ident),
        )

    loop, wrote, read = asyncio.run(where())
    if is_sqlite(gw.engine):
        assert wrote == read == loop
    else:
        assert wrote != loop and read != loop


def test_on_postgresql_a_request_waiting_on_a_row_lock_holds_up_no_other(gw: Gateway) -> None:
    if is_sqlite(gw.engine):  # one writer at a time there, by design: nothing to overlap
        return
    v = schema.volunteers
    with gw.engine.begin() as conn:
        for name in ("a", "b"):
            conn.execute(
                v.insert().values(
                    name=name, password_hash="x", authenticator=name, state="active", created_at=utcnow()
                )
            )

    def rename(name: str, to: str) -> None:
        with hot_begin(gw.engine) as conn:
            # were the wait on the event loop, the holder below could never let go: fail, not hang
            conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            conn.execute(update(v).where(v.c.name == name).values(name=to))

    def names() -> list[str]:
        with hot_read(gw.engine) as conn:
            return sorted(conn.execute(select(v.c.name)).scalars())

    async def main() -> None:
        with gw.engine.connect() as holder:  # another transaction holds volunteer a's row
            holder.execute(select(v).where(v.c.name == "a").with_for_update())
            blocked = asyncio.create_task(run_write(gw.engine, lambda: rename("a", "a2")))
            await asyncio.sleep(0.3)
            assert not blocked.done()  # waiting on the lock, in its thread
            await asyncio.wait_for(run_write(gw.engine, lambda: rename("b", "b2")), 10)
            assert await asyncio.wait_for(run_read(gw.engine, names), 10) == ["a", "b2"]
            holder.rollback()
        await asyncio.wait_for(blocked, 10)  # and it goes on once the lock is free
        assert await run_read(gw.engine, names) == ["a2", "b2"]

    asyncio.run(main())


def test_on_postgresql_busy_default_threads_hold_up_no_request_transaction(gw: Gateway) -> None:
    """Password hashing, certificate checks and file responses run in anyio's default thread pool; a
    burst of them (a wave of logins) must not queue the hot requests' transactions behind them."""
    if is_sqlite(gw.engine):  # they run on the event loop there
        return
    release = threading.Event()

    def count() -> int:
        with hot_read(gw.engine) as conn:
            return len(conn.execute(select(schema.volunteers.c.id)).all())

    def touch() -> int:
        with hot_begin(gw.engine) as conn:
            return conn.execute(update(schema.volunteers).values(state="active")).rowcount

    async def main() -> tuple[int, int]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = THREADS  # as the app's lifespan sets it
        busy = [asyncio.create_task(anyio.to_thread.run_sync(release.wait, 30)) for _ in range(THREADS)]
        try:
            await asyncio.sleep(0.2)
            assert limiter.borrowed_tokens == limiter.total_tokens  # every default thread is taken
            return (
                await asyncio.wait_for(run_read(gw.engine, count), 10),
                await asyncio.wait_for(run_write(gw.engine, touch), 10),
            )
        finally:
            release.set()
            await asyncio.gather(*busy)

    assert asyncio.run(main()) == (0, 0)


def test_upload_tokens_are_signed_after_the_commit(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A work request's and a heartbeat's upload token is signed once the transaction that records its
    credential has committed (the signature is ~50 µs of CPU that need not hold SQLite's writer turn):
    at signing time another connection already sees the credential's row."""
    api.submit(job("signed-late"))
    v = api.volunteer()
    issuer = api.gw.issuer
    seen: list[tuple[str, bool]] = []
    sign = issuer.sign

    def signing(grant: Grant) -> Issued:
        c = schema.credentials
        with read(api.gw.engine) as conn:
            row = conn.execute(select(c.c.kind, c.c.task_id).where(c.c.jti == grant.jti)).one_or_none()
        seen.append((grant.scope, row is not None and row.kind == "upload"))
        return sign(grant)

    monkeypatch.setattr(issuer, "sign", signing)
    (task,) = v.work()
    assert v.heartbeat(task).json()["upload_token"]
    scope = f"storage.create:/quarantine/{v.id}/{task['task_id']}"
    assert seen == [(scope, True), (scope, True)]
    # and the tokens are the ones recorded: each verifies, with the grant's id
    jtis = {issuer.verify(task["upload_token"]).jti}
    with read(api.gw.engine) as conn:
        c = schema.credentials
        recorded = set(conn.execute(select(c.c.jti).where(c.c.task_id == task["task_id"])).scalars())
    assert jtis < recorded and len(recorded) == 2
