"""PostgreSQL connections: what the gateway's processes may open together, checked against the server.

Every gateway process has a pool of its own: each `airlock serve` worker, and the process that runs
the background loops (a child of `serve` with one worker, the supervisor with several). PostgreSQL
refuses connections past `max_connections` ("sorry, too many clients already"), which would show up
under load, long after the start, as failed requests. So `serve` adds up the pools at start and refuses
to run when they could exceed what the server admits, saying what to change.
"""

from __future__ import annotations

from sqlalchemy import Engine, text

from airlock.core.errors import AirlockError


class ConnectionBudgetExceeded(AirlockError):
    code = "connection_budget_exceeded"


def gateway_processes(workers: int) -> int:
    """The processes that open a pool: the serving workers and the one running the loops (with one
    worker, its child; with several, the supervisor, which also runs them)."""
    return workers + 1


def server_limit(engine: Engine) -> tuple[int, int]:
    """PostgreSQL's `max_connections` and the slots of those reserved for superusers."""
    with engine.connect() as conn:
        total = int(conn.execute(text("SHOW max_connections")).scalar_one())
        reserved = int(conn.execute(text("SHOW superuser_reserved_connections")).scalar_one())
    return total, reserved


def check_connection_budget(engine: Engine, *, workers: int, per_process: int) -> int:
    """Raise `ConnectionBudgetExceeded` when the gateway's pools could open more connections than the
    PostgreSQL server admits; returns how many they may open. SQLite: nothing to check (0)."""
    if engine.dialect.name != "postgresql":
        return 0
    total, reserved = server_limit(engine)
    available = total - reserved
    processes = gateway_processes(workers)
    wanted = processes * per_process
    if wanted > available:
        fit = max(available // processes, 0)
        raise ConnectionBudgetExceeded(
            f"{processes} gateway processes ({workers} worker(s) and the background loops) may open "
            f"{per_process} PostgreSQL connections each, {wanted} in all, but the server admits "
            f"{available} (max_connections {total}, {reserved} reserved for superusers): set "
            f"database_connections to {fit} or less (AIRLOCK_DATABASE_CONNECTIONS), run fewer workers, "
            "or raise the server's max_connections"
        )
    return wanted
