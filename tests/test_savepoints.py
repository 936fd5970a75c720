"""`airlock.db.fast.savepoint`: every savepoint has the same name, so nested ones must still unwind in
order, on both databases: a failing inner block is undone alone, a failing outer block undoes what its
inner blocks kept, and the rest of the transaction commits."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, select

from airlock.context import Gateway
from airlock.db import schema
from airlock.db.engine import read
from airlock.db.fast import savepoint
from airlock.db.transitions import record_event


class Refused(Exception):
    pass


def test_nested_savepoints_unwind_in_order(gw: Gateway) -> None:
    def mark(conn: Connection, n: int) -> None:
        record_event(conn, "test", "savepoint.mark", "test", n)

    with gw.engine.begin() as conn:
        mark(conn, 1)
        with savepoint(conn):
            mark(conn, 2)
            with pytest.raises(Refused), savepoint(conn):
                mark(conn, 3)
                raise Refused
            mark(conn, 4)  # the outer savepoint is still there after the inner one was undone
            with savepoint(conn):
                mark(conn, 5)
        with pytest.raises(Refused), savepoint(conn):
            mark(conn, 6)
            with savepoint(conn):
                mark(conn, 7)  # released into the outer one, then undone with it
            raise Refused
        mark(conn, 8)
    e = schema.events
    with read(gw.engine) as conn:
        kept = conn.execute(select(e.c.object_id).where(e.c.action == "savepoint.mark").order_by(e.c.id))
        assert list(kept.scalars()) == [1, 2, 4, 5, 8]
