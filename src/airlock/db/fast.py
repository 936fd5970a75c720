"""Hot statements at driver speed, inside the caller's transaction.

`Connection.execute` costs about 60 µs of Python per statement (execution context, cache key, result
wrapping) on top of about 10 µs in the SQLite driver, and a scheduler RPC runs some twenty statements.
A `Fast` statement is still written with SQLAlchemy Core, so it stays portable and typed; it is compiled
once per dialect, and each execution goes straight to the DB-API cursor of the caller's connection (the
same transaction), with the column types' bind and result processors applied here: datetimes and JSON
come back exactly as `Connection.execute` returns them. Statements with expanding parameters (`IN` of a
bound list) are not supported; use `in_states` or a loop.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Plan:
    compiled: SQLCompiler
    sql: str
    positions: tuple[str, ...] | None  # parameter order for positional paramstyles, else None (named)
    binds: tuple[tuple[str, Callable[[Any], Any]], ...]
    row: Any  # namedtuple class of the result columns, or None
    results: tuple[Processor, ...]


class Fast:
    """One Core statement, executed on the raw cursor. `rows()`, `one_or_none()`, `scalar()` for
    queries, `run()` (the row count) for writes."""

    __slots__ = ("_plans", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._plans: dict[str, _Plan] = {}

    def _plan(self, dialect: Dialect) -> _Plan:
        plan = self._plans.get(dialect.name)
        if plan is not None:
            return plan
        compiled = self.statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if any(b.expanding for b in compiled.binds.values()):
            raise ValueError("Fast statements do not take expanding (list) parameters")
        processors = compiled._bind_processors
        columns = compiled._result_columns
        row = namedtuple("Row", [c[0] for c in columns], rename=True) if columns else None
        results = tuple(c[3]._cached_result_processor(dialect, None) for c in columns)
        plan = _Plan(
            compiled=compiled,
            sql=compiled.string,
            positions=tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None,
            binds=tuple((name, proc) for name, proc in processors.items() if callable(proc)),
            row=row,
            results=results,
        )
        self._plans[dialect.name] = plan
        return plan

    def _execute(self, conn: Connection, params: Mapping[str, Any] | None) -> tuple[_Plan, Any]:
        plan = self._plan(conn.dialect)
        values = plan.compiled.construct_params(params or {}, escape_names=False)
        for name, proc in plan.binds:
            if name in values:
                values[name] = proc(values[name])
        args: Any = tuple(values[n] for n in plan.positions) if plan.positions is not None else values
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(plan.sql, args)
        return plan, cursor

    def run(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Execute a write; the number of rows it touched."""
        _plan, cursor = self._execute(conn, params)
        count = int(cursor.rowcount)
        cursor.close()
        return count

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        plan, cursor = self._execute(conn, params)
        raw = cursor.fetchall()
        cursor.close()
        procs = plan.results
        if not any(procs):
            return [plan.row._make(r) for r in raw]
        return [plan.row._make([p(v) if p else v for p, v in zip(procs, r, strict=True)]) for r in raw]

    def one_or_none(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        found = self.rows(conn, params)
        if len(found) > 1:
            raise ValueError("more than one row where at most one was expected")
        return found[0] if found else None

    def scalar(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        row = self.one_or_none(conn, params)
        return None if row is None else row[0]
