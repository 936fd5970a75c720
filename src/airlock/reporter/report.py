"""The Reporter: what happened to a batch (or to everything), read from the database and trusted storage.

`build_report` only reads; `render_console` and `write_html` present the result.
"""

from __future__ import annotations

from sqlalchemy import Connection

from airlock.db.engine import utcnow
from airlock.reporter.collect import host_rows, outcomes, physics_files, return_times
from airlock.reporter.console import render_console
from airlock.reporter.html import write_html
from airlock.reporter.model import (
    HostRow,
    MissingOutput,
    Orphan,
    Outcomes,
    Reason,
    Reconciliation,
    Report,
    ReturnTimes,
    StateRow,
)
from airlock.reporter.reconcile import reconcile
from airlock.storage.base import Storage

__all__ = [
    "HostRow",
    "MissingOutput",
    "Orphan",
    "Outcomes",
    "Reason",
    "Reconciliation",
    "Report",
    "ReturnTimes",
    "StateRow",
    "build_report",
    "render_console",
    "write_html",
]


def build_report(conn: Connection, trusted: Storage, *, batch_id: int | None = None) -> Report:
    """Reconciliation, return times, success per host and task outcomes, for one batch or all of them."""
    return Report(
        generated_at=utcnow(),
        batch_id=batch_id,
        reconciliation=reconcile(conn, trusted, batch_id=batch_id),
        return_times=return_times(conn, batch_id=batch_id),
        hosts=host_rows(conn, batch_id=batch_id),
        outcomes=outcomes(conn, batch_id=batch_id),
        physics_files=[k for k in physics_files(conn, batch_id=batch_id) if trusted.exists(k)],
    )
