"""BOINC's file upload handler, in front of the same quarantine as the native data bridge.

A request body is a `<data_server_request>` header, then (for an upload) `<data>` and a newline and the
bytes from `<offset>` on. `<get_file_size>` asks how much of a file is here, so an interrupted upload
resumes. The file name is the capability: it carries an HMAC tag the scheduler made for one output of
one task (`airlock.boinc.names`), so only assigned files of tasks still leased are accepted.

Bytes land in an append-only partial file in the gateway's staging folder, locked while a request
writes to it. A resume may re-send bytes already accepted, but never change them: overlapping bytes are
compared, and any difference refuses the request. When the file is complete its MD5 is checked against
the client's, and only then is it streamed into the quarantine (adler32 and sha256 computed there) and
recorded, attributed to the task's volunteer and host, exactly as a native upload is.

Replies follow the client (sched/file_upload_handler.cpp): status 0 done, 1 transient (try later),
-1 permanent (the client gives up on the file), with a message for the volunteer.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from sqlalchemy import Engine, bindparam, select
from starlette.concurrency import run_in_threadpool

from airlock.boinc.names import NameSigner
from airlock.bridge.quarantine import UploadTarget, is_remote, record_upload
from airlock.core.states import TaskState, VolunteerState
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.schema import file_kind
from airlock.storage.base import AlreadyExists, Storage

MAX_HEADER_BYTES = 64 * 1024
CHUNK = 256 * 1024


class UploadRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # 1 transient, -1 permanent
        self.message = message


def _permanent(message: str) -> UploadRefused:
    return UploadRefused(-1, message)


def reply_xml(status: int, message: str | None = None, file_size: int | None = None) -> bytes:
    root = ET.Element("data_server_reply")
    ET.SubElement(root, "status").text = str(status)
    if file_size is not None:
        ET.SubElement(root, "file_size").text = str(file_size)
    if message:
        ET.SubElement(root, "message").text = message
    return ET.tostring(root) + b"\n"


@dataclass(frozen=True)
class UploadHeader:
    name: str
    nbytes: int
    md5: str
    offset: int


_TASK = (
    select(
        schema.tasks.c.state,
        schema.tasks.c.volunteer_id,
        schema.tasks.c.host_id,
        schema.tasks.c.deadline,
        schema.tasks.c.job_id,
        schema.jobs.c.spec,
        schema.volunteers.c.state.label("volunteer_state"),
    )
    .join(schema.jobs, schema.jobs.c.id == schema.tasks.c.job_id)
    .join(schema.volunteers, schema.volunteers.c.id == schema.tasks.c.volunteer_id)
    .where(schema.tasks.c.id == bindparam("task"))
)
_STORED = select(schema.files.c.size).where(
    file_kind("output"),
    schema.files.c.task_id == bindparam("task"),
    schema.files.c.name == bindparam("name"),
)


@dataclass
class UploadHandler:
    engine: Engine
    quarantine: Storage
    signer: NameSigner
    staging: Path
    max_request_bytes: int

    # ------------------------------------------------------------------------------- authorisation
    def authorise(self, name: str) -> UploadTarget:
        """The output this physical name was assigned as, if its task is still leased; else refused."""
        ids = NameSigner.output_ids(name)
        if ids is None:
            raise _permanent(f"{name[:80]!r} is not a file this project asked for")
        with read(self.engine) as conn:
            row = conn.execute(_TASK, {"task": ids.task_id}).one_or_none()
        outputs = row.spec["outputs"] if row is not None else []
        if row is None or row.job_id != ids.job_id or ids.index >= len(outputs):
            raise _permanent(f"{name}: no such task output")
        max_size = int(outputs[ids.index]["max_size"])
        if self.signer.parse_output_name(name, max_size) is None:
            raise _permanent(f"{name}: not a file this project asked for (bad tag)")
        if row.volunteer_state != VolunteerState.ACTIVE.value:
            raise _permanent("this volunteer account is blocked")
        if row.state != TaskState.LEASED.value or row.deadline <= utcnow():
            raise _permanent(f"{name}: its task is not assigned any more ({row.state}); upload refused")
        return UploadTarget(
            row.volunteer_id,
            ids.task_id,
            outputs[ids.index]["name"],
            row.job_id,
            row.host_id,
            max_size,
            is_remote(self.quarantine),
        )

    def _stored_size(self, target: UploadTarget) -> int | None:
        with read(self.engine) as conn:
            size = conn.execute(_STORED, {"task": target.task_id, "name": target.name}).scalar_one_or_none()
        return None if size is None else int(size)

    def _partial(self, name: str) -> Path:
        return self.staging / f"{name}.part"

    # ---------------------------------------------------------------------------------- requests
    async def handle(self, body: AsyncIterator[bytes], content_length: int | None) -> bytes:
        try:
            if content_length is not None and content_length > self.max_request_bytes:
                raise _permanent(
                    f"request of {content_length} bytes is over the {self.max_request_bytes} limit"
                )
            head, rest = await _read_header(body)
            request = _parse_header(head)
            if request.find("get_file_size") is not None:
                name = (request.findtext("get_file_size") or "").strip()
                return reply_xml(0, file_size=await run_in_threadpool(self.file_size, name))
            upload = _upload_header(request)
            target = await run_in_threadpool(self.authorise, upload.name)
            if upload.nbytes > target.max_size:
                raise _permanent(f"{upload.name} is {upload.nbytes} bytes; at most {target.max_size} allowed")
            await self._receive(target, upload, rest, body)
            return reply_xml(0)
        except UploadRefused as exc:
            return reply_xml(exc.status, exc.message)

    def file_size(self, name: str) -> int:
        target = self.authorise(name)
        stored = self._stored_size(target)
        if stored is not None:
            return stored
        partial = self._partial(name)
        return partial.stat().st_size if partial.exists() else 0

    async def _receive(
        self, target: UploadTarget, upload: UploadHeader, first: bytes, body: AsyncIterator[bytes]
    ) -> None:
        if self._stored_size(target) is not None:
            return  # complete and in quarantine already: a retry whose reply was lost
        self.staging.mkdir(parents=True, exist_ok=True)
        partial = self._partial(upload.name)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadRefused(1, f"{upload.name} is being uploaded by another request") from None
            have = os.fstat(fd).st_size
            if upload.offset > have:
                raise UploadRefused(1, f"{upload.name}: offset {upload.offset} is past the {have} bytes here")
            position = upload.offset
            async for chunk in _chain(first, body):
                if position + len(chunk) > upload.nbytes:
                    raise _permanent(f"{upload.name}: more bytes than the {upload.nbytes} declared")
                overlap = min(len(chunk), max(0, have - position))
                if overlap and os.pread(fd, overlap, position) != chunk[:overlap]:
                    raise _permanent(
                        f"{upload.name}: the resumed upload differs from the bytes already accepted; "
                        "accepted bytes are never rewritten"
                    )
                if len(chunk) > overlap:
                    os.pwrite(fd, chunk[overlap:], position + overlap)
                position += len(chunk)
                have = max(have, position)
            await run_in_threadpool(os.fsync, fd)
            if have < upload.nbytes:
                raise UploadRefused(1, f"{upload.name}: {have} of {upload.nbytes} bytes here; resume")
            md5 = await run_in_threadpool(_md5, partial)
            if md5 != upload.md5.lower():
                partial.unlink()
                raise _permanent(f"{upload.name}: MD5 {md5} differs from the declared {upload.md5}")
            await self._publish(target, partial)
        finally:
            os.close(fd)

    async def _publish(self, target: UploadTarget, partial: Path) -> None:
        """Stream the complete file into the quarantine, then record it; the partial goes last."""
        key = target.key
        pending = await self.quarantine.receive(key, _file_chunks(partial), max_size=target.max_size)
        digest = pending.digest

        def _commit() -> None:
            try:
                pending.publish()
            except AlreadyExists:
                pending.discard()
                have = self.quarantine.stat(key)
                if have is None or have.sha256 != digest.sha256 or have.size != digest.size:
                    raise _permanent(f"{target.name} was already uploaded with other content") from None
            with self.engine.begin() as conn:
                record_upload(conn, target, digest, None)
            partial.unlink(missing_ok=True)

        await run_in_threadpool(_commit)


def sweep_staging(engine: Engine, staging: Path, older_than_s: float) -> int:
    """Remove partial uploads untouched for `older_than_s` whose task is not leased any more (lost,
    reported, aborted): no resume can need them. One being written to (locked) is left alone."""
    if not staging.is_dir():
        return 0
    removed = 0
    now = time.time()
    for partial in staging.glob("*.part"):
        try:
            if now - partial.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue
        ids = NameSigner.output_ids(partial.name.removesuffix(".part"))
        if ids is not None:
            with read(engine) as conn:
                state = conn.execute(
                    select(schema.tasks.c.state).where(schema.tasks.c.id == ids.task_id)
                ).scalar_one_or_none()
            if state == TaskState.LEASED.value:
                continue
        fd = os.open(partial, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            partial.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        if chunk:
            yield chunk


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


async def _read_header(body: AsyncIterator[bytes]) -> tuple[bytes, bytes]:
    """The XML header (closed, so it parses) and the first data bytes after `<data>` and its newline."""
    buf = b""
    async for chunk in body:
        buf += chunk
        at = buf.find(b"<data>")
        if at >= 0 and len(buf) > at + 6:
            if at > MAX_HEADER_BYTES:
                break
            start = at + 6 + (1 if buf[at + 6 : at + 7] == b"\n" else 0)
            return buf[:at] + b"</file_upload></data_server_request>", buf[start:]
        if len(buf) > MAX_HEADER_BYTES + 8:
            break
    else:
        at = buf.find(b"<data>")
        if at >= 0:  # an upload of zero bytes
            return buf[:at] + b"</file_upload></data_server_request>", b""
        if len(buf) <= MAX_HEADER_BYTES:
            return buf, b""
    raise _permanent(f"the request header is over {MAX_HEADER_BYTES} bytes")


def _parse_header(head: bytes) -> ET.Element:
    try:
        root: ET.Element = fromstring(head, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise _permanent("the request uses forbidden XML (DTD or entities)") from None
    except (ET.ParseError, ValueError, UnicodeError) as exc:
        raise _permanent(f"the request is not well-formed XML: {exc}") from None
    if root.tag != "data_server_request":
        raise _permanent(f"expected <data_server_request>, got <{str(root.tag)[:40]}>")
    return root


def _number(el: ET.Element, path: str) -> int:
    raw = (el.findtext(path) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise _permanent(f"<{path}> is not a number: {raw[:40]!r}") from None
    if not 0 <= value <= 2**62 or value != int(value):
        raise _permanent(f"<{path}> is out of range: {raw[:40]!r}")
    return int(value)


def _upload_header(root: ET.Element) -> UploadHeader:
    up = root.find("file_upload")
    if up is None:
        raise _permanent("neither <get_file_size> nor <file_upload> in the request")
    name = (up.findtext("file_info/name") or "").strip()
    md5 = (up.findtext("md5_cksum") or "").strip()
    if not md5 or len(md5) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5):
        raise _permanent("the upload needs the file's <md5_cksum>")
    return UploadHeader(name=name, nbytes=_number(up, "nbytes"), md5=md5, offset=_number(up, "offset"))
