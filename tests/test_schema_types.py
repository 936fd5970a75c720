"""UTCDateTime on SQLite: the one-step processors store and read exactly what SQLAlchemy's generic
DATETIME path does, so values written before and after compare and sort alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import DateTime

from airlock.db.schema import UTCDateTime

SAMPLES = [
    datetime(2026, 12, 3, 10, 58, 16, 123456, tzinfo=UTC),
    datetime(2026, 12, 3, 10, 58, 16, tzinfo=UTC),  # no microseconds: still six digits stored
    datetime(999, 1, 2, 3, 4, 5, 7, tzinfo=UTC),  # a short year: still four digits
    datetime(2026, 12, 3, 12, 0, tzinfo=timezone(timedelta(hours=2))),  # not UTC: converted
]


def test_bind_matches_sqlalchemy_datetime_format() -> None:
    dialect = sqlite.dialect()
    fast = UTCDateTime().bind_processor(dialect)
    generic = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert fast is not None and generic is not None
    for value in SAMPLES:
        assert fast(value) == generic(value.astimezone(UTC).replace(tzinfo=None))
    assert fast(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        fast(datetime(2026, 1, 1))


def test_result_parses_every_stored_form() -> None:
    dialect = sqlite.dialect()
    fast = UTCDateTime().result_processor(dialect, None)
    assert fast is not None
    assert fast("2026-12-03 10:58:16.123456") == datetime(2026, 12, 3, 10, 58, 16, 123456, tzinfo=UTC)
    assert fast("2026-12-03 10:58:16") == datetime(2026, 12, 3, 10, 58, 16, tzinfo=UTC)
    assert fast("2026-12-03 10:58:16.5") == datetime(2026, 12, 3, 10, 58, 16, 500000, tzinfo=UTC)
    assert fast(None) is None


def test_round_trip_and_order_in_sqlite() -> None:
    engine = create_engine("sqlite://")
    meta = MetaData()
    t = Table("t", meta, Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
    meta.create_all(engine)
    with engine.begin() as conn:
        for i, value in enumerate(SAMPLES):
            conn.execute(insert(t).values(id=i, at=value))
        back = {r.id: r.at for r in conn.execute(select(t))}
        stored = conn.execute(text("SELECT at FROM t WHERE id = 1")).scalar_one()
        # SQL comparisons see the text: a bound datetime compares with stored ones in time order
        later = conn.execute(select(t.c.id).where(t.c.at > SAMPLES[1]).order_by(t.c.id)).scalars().all()
    assert stored == "2026-12-03 10:58:16.000000"
    for i, value in enumerate(SAMPLES):
        assert back[i] == value and back[i].tzinfo is UTC
    assert later == [0]
