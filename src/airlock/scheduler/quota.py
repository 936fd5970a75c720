"""Per-host daily quota, BOINC's rule: a host starts at the project's quota per core; each valid result
doubles it (up to that start value), each error, invalid or lost result takes one off (down to 1).
A broken host therefore cannot drain the queue."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, Integer, bindparam, case, update

from airlock.db import schema
from airlock.db.fast import Fast

_COUNTER = {"valid": "n_valid", "invalid": "n_invalid", "error": "n_error", "lost": "n_lost"}


def today(now: datetime) -> str:
    return now.date().isoformat()


def remaining(
    daily_quota: int, cores: int, quota_day: str | None, dispatched_today: int, now: datetime
) -> int:
    used = dispatched_today if quota_day == today(now) else 0
    return max(0, daily_quota * cores - used)


def _outcome_statement(outcome: str) -> Fast:
    h = schema.hosts
    counter = getattr(h.c, _COUNTER[outcome])
    max_quota = bindparam("max_quota", type_=Integer)
    if outcome == "valid":
        quota = case((h.c.daily_quota * 2 > max_quota, max_quota), else_=h.c.daily_quota * 2)
    else:
        capped = case((h.c.daily_quota > max_quota, max_quota), else_=h.c.daily_quota)
        quota = case((capped - 1 < 1, 1), else_=capped - 1)
    return Fast(
        update(h).where(h.c.id == bindparam("host")).values({counter: counter + 1, h.c.daily_quota: quota})
    )


_OUTCOME = {outcome: _outcome_statement(outcome) for outcome in _COUNTER}


def record_outcome(conn: Connection, host_id: int, outcome: str, max_quota: int) -> None:
    """Count a task outcome against its host and adjust the host's quota."""
    _OUTCOME[outcome].run(conn, {"host": host_id, "max_quota": max_quota})
