"""The connections that threads keep between their hot transactions (`hot_begin`, `hot_read`): a
thread's next transaction takes nothing from the pool, and threads that ended (a thread pool's workers
come and go) do not keep their places, so a new thread still gets one."""

from __future__ import annotations

import threading

from sqlalchemy import event, select

from airlock.context import Gateway
from airlock.db import engine as db_engine
from airlock.db import schema
from airlock.db.engine import hot_begin, hot_read


def _round(gw: Gateway) -> None:
    with hot_begin(gw.engine) as conn:
        conn.execute(select(schema.volunteers.c.id)).all()
    with hot_read(gw.engine) as conn:
        conn.execute(select(schema.jobs.c.id)).all()


def _second_round_checkouts(gw: Gateway) -> int:
    """In a new thread: one round of hot transactions, then how many connections a second one took."""
    taken: list[int] = []
    me: list[int] = []

    def work() -> None:
        me.append(threading.get_ident())
        _round(gw)
        event.listen(gw.engine, "checkout", lambda *_: taken.append(threading.get_ident()))
        _round(gw)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return len([t for t in taken if t == me[0]])


def test_a_thread_keeps_its_connections_between_transactions(gw: Gateway) -> None:
    assert _second_round_checkouts(gw) == 0


def test_the_places_of_ended_threads_go_to_new_threads(gw: Gateway) -> None:
    pins, _ = db_engine._pinned(gw.engine, read_only=True)
    ended = [gw.engine.connect() for _ in range(db_engine.MAX_PINNED_THREADS)]
    with pins.lock:  # every place held by a thread that is gone (no live thread has these idents)
        pins.conns = {(-1 - i, False): conn for i, conn in enumerate(ended)}
    assert _second_round_checkouts(gw) == 0  # the new thread got a place all the same
    assert all(conn.closed for conn in ended)  # and the ended threads' connections went back
