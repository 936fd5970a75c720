"""The content-addressed input cache: each input stored once, under its sha256."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from airlock.core.checksums import Digest
from airlock.core.errors import BadInput, NotFound
from airlock.core.schemas import HEX64, InputStored
from airlock.core.states import FileState
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.schema import file_kind
from airlock.storage.base import AlreadyExists, Storage

MAX_INPUT = 16 * 2**30


def input_key(sha256: str) -> str:
    return f"inputs/{sha256[:2]}/{sha256}"


async def receive_input(storage: Storage, chunks: AsyncIterator[bytes]) -> Digest:
    """Stream bytes into the cache, hashing them on the way, and publish them under their sha256.
    Bytes already cached are dropped: each input is stored once."""
    pending = await storage.receive(f"inputs/incoming/{uuid.uuid4().hex}", chunks, max_size=MAX_INPUT)
    key = input_key(pending.digest.sha256)
    if storage.exists(key):
        pending.discard()
    else:
        try:
            pending.publish(key)
        except AlreadyExists:
            pending.discard()
    return pending.digest


def register_input(conn: Connection, digest: Digest) -> InputStored:
    """Record an input published at `input_key(digest.sha256)`; idempotent."""
    try:
        with conn.begin_nested():
            conn.execute(
                insert(schema.files).values(
                    kind="input",
                    state=FileState.CACHED.value,
                    name=digest.sha256,
                    size=digest.size,
                    adler32=digest.adler32,
                    sha256=digest.sha256,
                    location=input_key(digest.sha256),
                    created_at=utcnow(),
                )
            )
    except IntegrityError:
        pass  # already cached
    return InputStored(sha256=digest.sha256, adler32=digest.adler32, size=digest.size)


def lookup_input(conn: Connection, sha256: str) -> Digest:
    if not HEX64.match(sha256):
        raise BadInput("an input is named by the 64 hex digits of its sha256")
    f = schema.files
    row = conn.execute(
        select(f.c.size, f.c.adler32, f.c.sha256).where(file_kind("input"), f.c.sha256 == sha256)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no input {sha256} in the cache")
    return Digest(row.size, row.adler32, row.sha256)
