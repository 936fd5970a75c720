"""The gateway's shared state: settings, database engine, token issuer and the storage areas."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from airlock.config import Settings
from airlock.credentials.keys import generate_signing_key, load_signing_keys, write_private
from airlock.credentials.tokens import TokenIssuer
from airlock.db.engine import is_sqlite, make_engine
from airlock.storage.base import Storage
from airlock.storage.local import LocalStorage
from airlock.storage.xrootd import XRootDStorage, open_xrootd

OPERATOR_TOKEN_FILE = "operator.token"


@dataclass
class Gateway:
    settings: Settings
    engine: Engine
    issuer: TokenIssuer
    inputs: Storage
    quarantine: Storage
    trusted: Storage
    operator_token: str | None  # None for processes that serve no operator API (worker, report)

    @classmethod
    def open(cls, settings: Settings, *, serving: bool = True) -> Gateway:
        """`serving=False` for processes that answer no HTTP (background loops, reports): they need no
        operator token."""
        keys = load_signing_keys(settings.keys_dir)
        if not keys:
            raise RuntimeError(f"no signing key in {settings.keys_dir}: run `airlock init` first")
        local = LocalStorage(settings.storage_dir)
        issuer = TokenIssuer(settings.token_issuer, keys, keys_dir=settings.keys_dir)
        engine = make_engine(settings.db_url, connections=settings.database_connections)
        bridge: Storage = local if settings.bridge == "local" else open_xrootd(settings, issuer)
        # A quarantined file is as durable as the row that accepts it, no more: SQLite in WAL mode
        # with synchronous=NORMAL survives a process crash but may lose its last commits in a power cut,
        # so fsyncing the file before that row would buy nothing. (A file that outlives its row is
        # taken as a retry of the same upload; a row whose file was lost fails validation and the task
        # is reissued.) On PostgreSQL commits are durable and so are the files. Inputs and trusted
        # storage are always fsynced.
        quarantine: Storage = bridge
        if settings.bridge == "local" and is_sqlite(engine):
            quarantine = LocalStorage(settings.storage_dir, fsync=False)
        return cls(
            settings=settings,
            engine=engine,
            issuer=issuer,
            inputs=local,
            quarantine=quarantine,
            trusted=bridge,
            operator_token=resolve_operator_token(settings) if serving else None,
        )

    def close(self) -> None:
        self.engine.dispose()
        if isinstance(self.quarantine, XRootDStorage):
            self.quarantine.close()


def resolve_operator_token(settings: Settings) -> str:
    if settings.operator_token:
        return settings.operator_token
    path = settings.keys_dir / OPERATOR_TOKEN_FILE
    if not path.exists():
        raise RuntimeError(f"no operator token: set AIRLOCK_OPERATOR_TOKEN or run `airlock init` ({path})")
    return path.read_text().strip()


def initialise(settings: Settings) -> list[Path]:
    """Create the data folder, the signing key and an operator token (mode 0600). Idempotent."""
    created: list[Path] = []
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not load_signing_keys(settings.keys_dir):
        key = generate_signing_key(settings.keys_dir)
        created.append(settings.keys_dir / f"token-{key.kid}.pem")
    token_path = settings.keys_dir / OPERATOR_TOKEN_FILE
    if settings.operator_token is None and not token_path.exists():
        write_private(token_path, (secrets.token_urlsafe(32) + "\n").encode())
        created.append(token_path)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    return created
