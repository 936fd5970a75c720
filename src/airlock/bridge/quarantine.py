"""The embedded data bridge: upload-only, checksummed, immutable, per-task paths.

A volunteer's upload token carries `storage.create:/quarantine/<volunteer>/<task>`; with it the volunteer
may create the job's declared output names under that path, once each, up to their declared sizes. There
is no way to read, list, overwrite or delete. Bytes stream to disk under a hidden temporary name while
adler32 and sha256 are computed; only a complete upload matching its declared digests is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, text, update
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from starlette.concurrency import run_in_threadpool

from airlock.core.checksums import Digest, parse_digest_header
from airlock.core.errors import BadInput, Conflict, Forbidden, Gone, NotFound, TooLarge, Unauthorized
from airlock.core.schemas import UploadAccepted, check_file_name
from airlock.core.states import FileState
from airlock.credentials.accounts import check_active, require_active
from airlock.credentials.tokens import Claims, allows_create, quarantine_path
from airlock.db import schema
from airlock.db.engine import hot_begin, hot_read, run_read, run_write, utcnow, writer_gate
from airlock.db.fast import Fast, bound
from airlock.db.transitions import record_event
from airlock.scheduler.leases import lease_is_live
from airlock.storage.base import AlreadyExists, Storage


class ChecksumMismatch(BadInput):
    status = 422
    code = "checksum_mismatch"


@dataclass(frozen=True)
class UploadTarget:
    volunteer_id: int
    task_id: int
    name: str
    job_id: int
    host_id: int
    max_size: int
    remote: bool = False  # kept on a remote quarantine (XRootD), not the gateway's own folder

    @property
    def key(self) -> str:
        """Where the file is kept (its row's `location`): see `output_key` and `remote_output_key`."""
        if self.remote:
            return remote_output_key(self.volunteer_id, self.task_id, self.name)
        return output_key(self.volunteer_id, self.task_id, self.name)

    @property
    def path(self) -> str:
        return upload_path(self.volunteer_id, self.task_id, self.name)


def upload_path(volunteer_id: int, task_id: int, name: str) -> str:
    """The path a volunteer uploads a task's output to, under its upload token's scope."""
    return f"{quarantine_path(volunteer_id, task_id)}/{name}"


def is_remote(quarantine: Storage) -> bool:
    """Whether `quarantine` is remote storage (its keys are the volunteers' upload paths)."""
    return quarantine.name != "local"


def output_key(volunteer_id: int, task_id: int, name: str) -> str:
    """A task's output in the gateway's own quarantine (the embedded bridge, BOINC's upload handler):
    one file per output in its volunteer's folder, named `<task>.<name>` (a task id has no dot). No folder
    per task: each would be made for one upload and removed again after assimilation, and on ext4 without
    a journal every new inode's allocation steps over each inode freed in the last minutes (in one run on
    the benchmark machine, a seventh of the gateway's CPU went to the kernel's `recently_deleted`)."""
    return f"quarantine/{volunteer_id}/{task_id}.{name}"


def remote_output_key(volunteer_id: int, task_id: int, name: str) -> str:
    """A task's output on a remote quarantine, where the volunteer writes it itself: the path its upload
    token's scope names, `quarantine/<volunteer>/<task>/<name>`."""
    return upload_path(volunteer_id, task_id, name).lstrip("/")


def remote_task_folder(volunteer_id: int, task_id: int) -> str:
    """The folder of a task's uploads on a remote quarantine (listed for undeclared names)."""
    return quarantine_path(volunteer_id, task_id).lstrip("/")


_TASK_FOR_UPLOAD = Fast(
    select(
        schema.volunteers.c.state.label("volunteer_state"),
        schema.tasks.c.state,
        schema.tasks.c.volunteer_id,
        schema.tasks.c.host_id,
        schema.tasks.c.lease_expires_at,
        schema.tasks.c.deadline,
        schema.tasks.c.job_id,
        schema.jobs.c.spec,
    )
    .join(schema.jobs, schema.jobs.c.id == schema.tasks.c.job_id)
    .outerjoin(schema.volunteers, schema.volunteers.c.id == bindparam("volunteer"))
    .where(schema.tasks.c.id == bindparam("task"))
)


def authorise_upload(
    conn: Connection, claims: Claims, volunteer_id: int, task_id: int, name: str, *, remote: bool = False
) -> UploadTarget:
    """Everything that must hold before a byte is accepted. `remote`: the upload goes on to a remote
    quarantine (see `UploadTarget.key`)."""
    try:
        check_file_name(name)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    path = upload_path(volunteer_id, task_id, name)
    if claims.volunteer_id != volunteer_id or not allows_create(claims, path):
        raise Forbidden(f"this token does not allow creating {path}")
    row = _TASK_FOR_UPLOAD.one_or_none(conn, {"task": task_id, "volunteer": volunteer_id})
    if row is None:
        require_active(conn, volunteer_id)  # an unknown or blocked volunteer hears that first
        raise NotFound(f"no task {task_id}")
    check_active(row.volunteer_state)
    if row.volunteer_id != volunteer_id:
        raise Forbidden(f"task {task_id} is not assigned to you")
    if not lease_is_live(row, utcnow()):
        raise Gone(f"task {task_id} is not leased to you any more ({row.state}); uploads are closed")
    declared = {o["name"]: int(o["max_size"]) for o in row.spec["outputs"]}
    if name not in declared:
        raise Forbidden(f"{name!r} is not an output of this job (declared: {sorted(declared)})")
    return UploadTarget(volunteer_id, task_id, name, row.job_id, row.host_id, declared[name], remote)


_F = schema.files


def _insert_output_once(dialect_insert: Any) -> Fast:
    """The quarantined file's row, unless the task has one of that name (its id, or None): one statement
    where a lookup and an insert were two, and a concurrent retry on PostgreSQL waits for the first and
    inserts nothing."""
    return Fast(
        dialect_insert(_F)
        .values(
            kind="output",
            state=FileState.QUARANTINED.value,
            **bound(_F, "name", "size", "adler32", "sha256", "location", "job_id", "task_id"),
            **bound(_F, "volunteer_id", "host_id", "created_at"),
        )
        .on_conflict_do_nothing(  # the partial unique index uq_files_output_task_name
            index_elements=[_F.c.task_id, _F.c.name], index_where=text("kind = 'output'")
        )
        .returning(_F.c.id)
    )


_INSERT_OUTPUT = {"sqlite": _insert_output_once(sqlite.insert), "postgresql": _insert_output_once(pg.insert)}
_UPLOAD_RATE = Fast(
    update(schema.hosts).where(schema.hosts.c.id == bindparam("host")).values(upload_rate=bindparam("rate"))
)


def record_upload(conn: Connection, target: UploadTarget, digest: Digest, rate: float | None) -> bool:
    """Insert the quarantined file's row; False if this exact file was recorded before (a retry)."""
    fid = _INSERT_OUTPUT[conn.dialect.name].scalar(
        conn,
        {
            "name": target.name,
            "size": digest.size,
            "adler32": digest.adler32,
            "sha256": digest.sha256,
            "location": target.key,
            "job_id": target.job_id,
            "task_id": target.task_id,
            "volunteer_id": target.volunteer_id,
            "host_id": target.host_id,
            "created_at": utcnow(),
        },
    )
    if fid is None:
        return False
    if rate is not None:
        _UPLOAD_RATE.run(conn, {"host": target.host_id, "rate": rate})
    record_event(
        conn,
        f"host:{target.host_id}",
        "file.uploaded",
        "file",
        fid,
        {
            "task_id": target.task_id,
            "name": target.name,
            "size": digest.size,
            "adler32": digest.adler32,
            "sha256": digest.sha256,
        },
    )
    return True


async def receive_upload(
    engine: Engine,
    quarantine: Storage,
    claims: Claims | None,
    volunteer_id: int,
    task_id: int,
    name: str,
    headers: dict[str, str],
    body: AsyncIterator[bytes],
) -> tuple[UploadAccepted, bool]:
    """Accept one output upload. Returns the receipt and whether it created the file (False: the same
    bytes were uploaded before, a retried request)."""
    if claims is None:
        raise Unauthorized("an upload needs the task's upload token (Authorization: Bearer ...)")

    def _authorise() -> UploadTarget:
        with hot_read(engine) as conn:
            return authorise_upload(conn, claims, volunteer_id, task_id, name, remote=is_remote(quarantine))

    target = await run_read(engine, _authorise)
    declared = _declared_digest(headers)
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        raise BadInput("an upload needs a Content-Length (chunked uploads are not accepted)")
    if int(length) > target.max_size:
        raise TooLarge(f"{name} may be at most {target.max_size} bytes; this upload is {length}")
    started = time.monotonic()
    pending = await quarantine.receive(target.key, body, max_size=target.max_size)
    digest = pending.digest
    if digest.size != int(length):
        pending.discard()
        raise BadInput(f"the body ended after {digest.size} of {length} bytes; nothing was stored")
    if digest.adler32 != declared.get("adler32", digest.adler32) or digest.sha256 != declared["sha256"]:
        pending.discard()
        raise ChecksumMismatch(
            f"{name}: received adler32 {digest.adler32}, sha-256 {digest.sha256[:16]}..., "
            "which differ from the Digest header; nothing was stored"
        )
    elapsed = time.monotonic() - started
    rate = digest.size / elapsed if elapsed > 0 and digest.size >= 65536 else None

    def _link() -> bool:
        """Put the file under its name; False if the same bytes are there already (a retried upload)."""
        try:
            pending.publish()
        except AlreadyExists:
            pending.discard()
            # Either a retry of the same bytes (fine) or an attempt to overwrite (refused).
            have = quarantine.stat(target.key)
            if have is None or have.sha256 != digest.sha256 or have.size != digest.size:
                raise Conflict(
                    f"{name} was already uploaded for task {task_id}; files in quarantine are immutable"
                ) from None
            return False
        return True

    def _record() -> bool:  # the row may be missing on a retry, if a crash came in between
        with hot_begin(engine) as conn:
            return record_upload(conn, target, digest, rate)

    def _publish() -> bool:
        fresh = _link()
        return _record() and fresh

    if not pending.blocking:
        # A local quarantine on SQLite publishes with a link(2) and no fsync (see `Gateway.open`):
        # cheaper on the event loop than a hand-off to a thread and back, and done before the writer
        # turn, which is then held for the row alone. A file under its name whose row is missing is
        # taken as a retry of the same upload; the row is recorded even if the client goes away.
        fresh = _link()
        created = await asyncio.shield(run_write(engine, _record)) and fresh
    elif writer_gate(engine) is not None:
        created = await run_in_threadpool(_publish)  # a publish that fsyncs may wait on the disk
    else:
        # PostgreSQL: `run_write` runs it in a worker thread, with the other requests' transactions
        # (one limiter, so their threads keep their connections).
        created = await run_write(engine, _publish)
    receipt = UploadAccepted(path=target.path, size=digest.size, adler32=digest.adler32, sha256=digest.sha256)
    return receipt, created


def _declared_digest(headers: dict[str, str]) -> dict[str, str]:
    raw = headers.get("digest")
    if not raw:
        raise BadInput("an upload needs a Digest header: 'Digest: adler32=<hex>,sha-256=<base64>'")
    try:
        declared = parse_digest_header(raw)
    except ValueError as exc:
        raise BadInput(f"malformed Digest header: {exc}") from exc
    if "sha256" not in declared:
        raise BadInput("the Digest header must give sha-256 (adler32 is checked too when given)")
    return declared
