"""`db.transitions.transition_many`: several objects of one kind moved in one statement, each one that
moved with its own audit event, the others left as they were; a target no state leads to is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from airlock.core.errors import IllegalTransition
from airlock.core.states import JobState, UpstreamJobState
from airlock.db import schema
from airlock.db.engine import read
from airlock.db.transitions import _legal, _transition_statement, transition, transition_many

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


def test_states_of_two_machines_that_share_a_name_keep_their_own_statements(api: Api) -> None:
    """JobState.DONE and UpstreamJobState.DONE are equal strings: the statements cached per transition
    shape must still be each machine's own (a job's statement used for an upstream job failed on a
    column jobs do not have, in whichever order the process met them first)."""
    clear = (_legal.cache_clear, _transition_statement.cache_clear)
    for first, second in [(JobState.DONE, UpstreamJobState.DONE), (UpstreamJobState.DONE, JobState.DONE)]:
        for c in clear:
            c()
        with api.gw.engine.begin() as conn:
            for target in (first, second):
                values = {"error": None} if isinstance(target, UpstreamJobState) else {"reason": None}
                assert not transition(conn, target, 999_999, "test", values=values)  # no such row
                assert not transition_many(conn, target, {999_999: None}, "test", values=values)
