"""`db.transitions.transition_many`: several objects of one kind moved in one statement, each one that
moved with its own audit event, the others left as they were; a target no state leads to is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from airlock.core.errors import IllegalTransition
from airlock.core.states import JobState
from airlock.db import schema
from airlock.db.engine import read
from airlock.db.transitions import transition, transition_many

from .helpers import Api, job


def test_many_objects_move_in_one_statement_each_with_its_own_event(api: Api) -> None:
    ids = api.submit(job("a"), job("b"), job("c"), job("d"))["jobs"]
    a, b, c, d = ids
    j, e = schema.jobs, schema.events
    with api.gw.engine.begin() as conn:
        assert transition(conn, JobState.CANCELLED, b, "test")  # b can no longer fail
        details = {d: {"n": 4}, a: {"n": 1}, b: {"n": 2}, c: {"n": 3}}
        moved = transition_many(conn, JobState.FAILED, details, "test:many", values={"reason": "gone"})
    assert moved == [d, a, c]  # those that moved, in the order given
    with read(api.gw.engine) as conn:
        rows = {r.id: (r.state, r.reason) for r in conn.execute(select(j.c.id, j.c.state, j.c.reason))}
        events = conn.execute(
            select(e.c.object_id, e.c.action, e.c.detail).where(e.c.actor == "test:many").order_by(e.c.id)
        ).all()
    assert rows == {
        a: ("failed", "gone"),
        b: ("cancelled", None),
        c: ("failed", "gone"),
        d: ("failed", "gone"),
    }
    assert [(ev.object_id, ev.action, ev.detail) for ev in events] == [
        (d, "job.failed", {"n": 4}),
        (a, "job.failed", {"n": 1}),
        (c, "job.failed", {"n": 3}),
    ]
    with api.gw.engine.begin() as conn:  # none may move again, and nothing is recorded
        assert transition_many(conn, JobState.FAILED, dict.fromkeys(ids), "test:again") == []
        assert transition_many(conn, JobState.FAILED, {}, "test:again") == []
    assert api.count(e, e.c.actor == "test:again") == 0


def test_a_target_no_state_leads_to_is_refused(api: Api) -> None:
    (a,) = api.submit(job("a"))["jobs"]
    with api.gw.engine.begin() as conn, pytest.raises(IllegalTransition, match="never enter"):
        transition_many(conn, JobState.QUEUED, {a: None}, "test")
