"""Persistence: SQLAlchemy Core tables, the engine, Alembic migrations and the transition helper."""
