"""A work request reads a handful of tasks, however many the gateway has finished before: the ready ones
come from the index of task states, and "has this volunteer a task of the job already" is an index
lookup, on SQLite and on PostgreSQL alike. (PostgreSQL's planner once scanned every task for the
second, and walked the finished tasks in id order for the first: a cost growing with all work ever done.)"""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import Connection, update

from airlock.db import schema
from airlock.db.engine import is_sqlite
from airlock.scheduler.dispatch import _CANDIDATES_QUERY

from .helpers import Api, job

FINISHED = READY = 1200
LIMIT = 8


def _explain(conn: Connection, how: str, volunteer_id: int) -> list[Any]:
    """`EXPLAIN <how>` of the work request's candidate query as the scheduler runs it. On PostgreSQL as a
    prepared statement on a generic plan, which psycopg's prepared statements come to after a few
    executions: a plan made without the parameters' values."""
    query = (
        _CANDIDATES_QUERY
        if is_sqlite(conn)
        else _CANDIDATES_QUERY.with_for_update(of=schema.tasks, skip_locked=True)
    )
    compiled = query.compile(dialect=conn.dialect)
    values = compiled.construct_params(
        {"cores": 4, "memory": 8000, "disk": 50_000, "volunteer": volunteer_id, "limit": LIMIT}
    )
    if compiled.positional:
        args = tuple(values[k] for k in compiled.positiontup or ())
        return list(conn.exec_driver_sql(f"EXPLAIN {how} {compiled}", args).all())
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", str(compiled))))
    sql = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", str(compiled))
    conn.exec_driver_sql(f"PREPARE candidates AS {sql}".replace("%", "%%"))
    conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
    given = ", ".join(repr(values[n]) if isinstance(values[n], str) else str(values[n]) for n in names)
    return list(conn.exec_driver_sql(f"EXPLAIN {how} EXECUTE candidates({given})").all())


def _task_rows_read(plan: dict[str, Any]) -> int:
    """Rows of `tasks` that a PostgreSQL plan (EXPLAIN ANALYZE, JSON) read: returned or filtered out."""
    here = 0
    if plan.get("Relation Name") == "tasks":
        loops = plan.get("Actual Loops", 1)
        here = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * loops
    return here + sum(_task_rows_read(child) for child in plan.get("Plans", []))


def test_a_work_request_reads_a_few_tasks_not_every_task_ever_run(api: Api) -> None:
    api.submit(*(job(f"old-{i}") for i in range(FINISHED)), name="finished")
    old = api.volunteer()
    with api.gw.engine.begin() as conn:  # all of them done long ago, by one volunteer (lowest ids first)
        conn.execute(update(schema.tasks).values(state="valid", volunteer_id=old.id, host_id=old.host_id))
    api.submit(*(job(f"new-{i}") for i in range(READY)), name="ready")
    me = api.volunteer()

    with api.gw.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        if is_sqlite(conn):
            steps = [row[3] for row in _explain(conn, "QUERY PLAN", old.id)]
            on_tasks = [s for s in steps if " tasks" in s]
            assert on_tasks and not [s for s in on_tasks if s.startswith("SCAN")], steps
            assert steps[0] == "SEARCH tasks USING INDEX ix_tasks_state (state=?)", steps
        else:
            ((raw,),) = _explain(conn, "(ANALYZE, FORMAT JSON)", old.id)
            plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
            read = _task_rows_read(plan)
            assert read <= 10 * LIMIT, f"read {read} task rows for {LIMIT} candidates:\n{json.dumps(plan)}"
        conn.rollback()

    tasks = me.work(slots=3)  # and the query still finds what it should: ready tasks, oldest first
    assert len(tasks) == 3
    assert [t["task_id"] for t in tasks] == sorted(t["task_id"] for t in tasks)
