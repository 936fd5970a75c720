"""Fixtures: a gateway on SQLite and on PostgreSQL, an in-process API client, and simulated volunteers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from airlock.api.server import serving_app
from airlock.config import load_settings
from airlock.context import Gateway, initialise
from airlock.db.migrate import upgrade

from .helpers import OPERATOR_TOKEN, Api

# The session's DIRAC server and its client (`dirac_server`, `dirac_client`), registered once for the
# whole suite: a module that imported them would make its own session fixture and a second server.
pytest_plugins = ["tests.dirac_fixture"]

# Under pytest-xdist (`make test` runs the suite on several workers) these modules run on one worker,
# one after the other: the session's DIRAC server is one per machine (held by a lock), and two DIRAC
# bring-ups at once would fill the one wheel cache side by side on a cold machine. Every other test is
# its own unit of work. (xdist's own `xdist_group` mark is not honoured under pytest 9.)
DIRAC_MODULES = frozenset(
    {"tests/test_dirac_upstream.py", "tests/test_upstream_dirac.py", "tests/test_bench_upstream.py"}
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class DiracTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "dirac" if nodeid.split("::", 1)[0] in DIRAC_MODULES else nodeid

    return DiracTogether(config, log)


PG_ADMIN = os.environ.get("AIRLOCK_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_required() -> bool:
    return os.environ.get("AIRLOCK_TEST_POSTGRES") == "required" or os.environ.get("CI") == "true"


@pytest.fixture(autouse=True)
def cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 at its default cost takes ~0.4 s per volunteer. The in-process tests are not about password
    hashing; the end-to-end tests run the real cost inside the gateway process."""
    from argon2 import PasswordHasher

    from airlock.credentials import accounts

    monkeypatch.setattr(accounts, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    import psycopg

    try:
        conn = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL not reachable at {PG_ADMIN}: {exc}"
        if _postgres_required():
            pytest.fail(reason + " (required here: run `make postgres`)")
        print(f"SKIP postgres: {reason}")
        pytest.skip(reason)
    yield conn
    conn.close()


def fresh_pg_database(pg_admin: Any) -> Iterator[str]:
    name = f"airlock_test_{uuid.uuid4().hex[:12]}"
    pg_admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'airlock.db'}"
        return
    yield from fresh_pg_database(request.getfixturevalue("pg_admin"))


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Tests override settings by redefining this fixture or updating the dict before `gw` is built."""
    return {}


@pytest.fixture
def gw(db_url: str, tmp_path: Path, settings_overrides: dict[str, Any]) -> Iterator[Gateway]:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "operator_token": OPERATOR_TOKEN,
        "public_url": "http://testserver",
        "background": False,
    }
    values.update(settings_overrides)
    settings = load_settings(**values)
    initialise(settings)
    gateway = Gateway.open(settings)
    upgrade(gateway.engine)
    yield gateway
    gateway.close()


@pytest.fixture
def api(gw: Gateway) -> Iterator[Api]:
    """The application `airlock serve` runs: the hot-route front before FastAPI."""
    with TestClient(serving_app(gw, background=False)) as client:
        yield Api(client, gw)
