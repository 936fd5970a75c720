"""Alembic environment: runs on the connection `airlock.db.migrate` hands over."""

from alembic import context

from airlock.db.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` on the command line
    from airlock.db.engine import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    connection = engine.connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
