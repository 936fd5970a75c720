"""The Alembic migrations build exactly the schema the code declares (`airlock.db.schema`), on SQLite and
on PostgreSQL: a table, column, index or constraint added to one and not the other is a difference."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from airlock.context import Gateway
from airlock.db.schema import metadata


def test_the_migrations_build_the_declared_schema(gw: Gateway) -> None:
    dialect = gw.engine.dialect.name

    def declared_here(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        # an index declared for one database only (`Index.ddl_if(dialect=...)`) is not made on the other
        only = getattr(obj, "_ddl_if", None)
        return only is None or only.dialect in (None, dialect)

    with gw.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": declared_here})
        differences = compare_metadata(context, metadata)
    assert differences == [], "\n".join(map(str, differences))
