"""Local-folder storage, the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from airlock.core.checksums import CHUNK, Digest, StreamingDigest, digest_file, digest_stream
from airlock.core.errors import TooLarge
from airlock.storage.base import (
    PARTIAL,
    STAGING,
    AlreadyExists,
    DeferredSyncs,
    DigestMismatch,
    StorageError,
    fsync_path,
    staging_key,
)

_fsync_dir = fsync_path  # a folder's entries (its own name, for tests to watch)


def _anonymous_file(folder: Path) -> int | None:
    """An unnamed file in `folder` (O_TMPFILE), or None where the filesystem has none: nothing of it is
    visible until it is linked to its name, and a crash before that leaves nothing behind to sweep.
    FileNotFoundError if `folder` does not exist."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o600)
    except FileNotFoundError:
        raise  # no such folder (yet)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _link_anonymous(fd: int, final: Path) -> None:
    """Give the O_TMPFILE file `fd` its name; FileExistsError if the name is taken (create-only).
    linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/<fd>, which `os.link` only uses with a dir fd."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), final, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def _close_pending(fd: int, tmp: Path | None) -> None:
    """Close a pending file that will not be published, and remove its hidden name if it has one."""
    os.close(fd)
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def _abandon(opening: asyncio.Future[tuple[int, Path | None]]) -> None:
    """Close a pending file whose upload was cancelled while it was being opened."""
    if not opening.cancelled() and opening.exception() is None:
        _close_pending(*opening.result())


class PendingFile:
    """A received file, not yet under its name: `publish()` it once verified, else `discard()` it.
    It is held open (`fd`): an unnamed file where the filesystem allows, else under a hidden temporary
    name (`tmp`)."""

    def __init__(self, storage: LocalStorage, final: Path, digest: Digest, fd: int, tmp: Path | None) -> None:
        self._storage, self._final, self.digest = storage, final, digest
        self._fd: int | None = fd
        self._tmp = tmp
        self.blocking = storage.fsync

    def publish(self, key: str | None = None) -> None:
        """With fsync, this blocks: call it from a worker thread then, not the event loop."""
        assert self._fd is not None, "published or discarded already"
        final = self._final if key is None else self._storage.path(key)
        if self._tmp is not None or key is not None:  # else it is open in its folder: that is there
            self._storage._make_folder(final.parent)
        try:
            if self._storage.fsync:
                os.fsync(self._fd)
            if self._tmp is not None:
                self._storage._publish(self._tmp, final)  # links, removes the name, syncs the folder
                return
            try:
                self._link(final)
            except FileNotFoundError:  # its folder was removed meanwhile: make it again
                self._storage._make_folder(final.parent)
                self._link(final)
        finally:
            self.discard()
        if self._storage.fsync:
            _fsync_dir(final.parent)

    def _link(self, final: Path) -> None:
        assert self._fd is not None
        try:
            _link_anonymous(self._fd, final)
        except FileExistsError as exc:
            raise AlreadyExists(f"{final.name} already exists") from exc

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


class LocalStorage:
    """Files under one root folder; a partial write lives under a hidden temporary name and is linked
    to its key only once complete and verified (link(2) fails if the key exists: create-only)."""

    name = "local"

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._device = self.root.stat().st_dev

    def path(self, key: str) -> Path:
        pure = PurePosixPath(key)
        if pure.is_absolute() or any(part in {"", ".", ".."} for part in pure.parts) or not pure.parts:
            raise StorageError(f"invalid storage key {key!r}")
        return self.root.joinpath(*pure.parts)

    def _make_folder(self, folder: Path, syncs: DeferredSyncs | None = None) -> None:
        """Make `folder` and any missing folders above it, up to the root. With fsync, each new folder's
        name is synced in its parent before anything goes in it (or, with `syncs`, before the batch is
        recorded): fsyncing a file and its own folder does not make a folder made for it survive a power
        cut (POSIX; ext4 happens to, other filesystems need it). A folder found already there was synced
        by whoever made it."""
        if folder == self.root:
            return
        try:
            folder.mkdir()
        except FileExistsError:
            return
        except FileNotFoundError:
            self._make_folder(folder.parent, syncs)
            try:
                folder.mkdir()
            except FileExistsError:
                return
        self._sync_folder(folder.parent, syncs)

    def _sync_file_and_folders(self, final: Path, syncs: DeferredSyncs | None) -> None:
        """fsync (or add to `syncs`) a file and every folder from its own up to the root."""
        batch = syncs if syncs is not None else DeferredSyncs()
        batch.file(final)
        folder = final.parent
        while True:
            batch.folder(folder)
            if folder == self.root:
                break
            folder = folder.parent
        if syncs is None:
            batch.flush()

    def _sync_folder(self, folder: Path, syncs: DeferredSyncs | None) -> None:
        if not self.fsync:
            return
        if syncs is None:
            _fsync_dir(folder)
        else:
            syncs.folder(folder)

    def _temp_for(self, key: str) -> Path:
        """A temporary name for a write to `key`, in its area's staging folder (made if need be): on the
        same filesystem as the key, so link(2) publishes it."""
        tmp = self.path(staging_key(key))
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            os.link(tmp, final)
        except FileExistsError as exc:
            raise AlreadyExists(f"{final.name} already exists") from exc
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(final.parent)

    async def receive(self, key: str, chunks: AsyncIterator[bytes], *, max_size: int) -> PendingFile:
        final = self.path(key)  # whether `key` is taken is decided atomically by publish()
        if self.fsync:  # a new folder is synced in its parent: that may wait on the disk, in a thread
            opening = asyncio.get_running_loop().run_in_executor(None, self._pending_file, key, final)
            try:
                fd, tmp = await asyncio.shield(opening)
            except asyncio.CancelledError:  # the upload went away: close the file once it is open
                opening.add_done_callback(_abandon)
                raise
        else:
            # Without fsync the folder and the unnamed file (two inode allocations) are made right here,
            # on the event loop. In a worker thread they cost more than they overlapped: each hand-off
            # woke a thread that then took the GIL from the loop, and the loop's next calls into SQLite
            # waited to get it back (measured on SQLite: a read snapshot's first two statements took
            # 60-125 µs instead of 3-12, a cycle 1.37-1.40 ms of CPU instead of 1.13-1.27).
            fd, tmp = self._pending_file(key, final)
        digest = StreamingDigest()
        try:
            with open(fd, "wb", closefd=False) as fh:
                async for chunk in chunks:
                    if digest.size + len(chunk) > max_size:
                        raise TooLarge(f"upload exceeds the declared maximum of {max_size} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
        except BaseException:
            _close_pending(fd, tmp)
            raise
        return PendingFile(self, final, digest.digest(), fd, tmp)

    def _pending_file(self, key: str, final: Path) -> tuple[int, Path | None]:
        """The open file an upload to `final` is written into: unnamed where the filesystem allows, else
        under a hidden temporary name (returned with it). Its folder (a volunteer's, in the quarantine)
        is usually there already: made only when opening a file in it finds none."""
        try:
            fd, tmp = _anonymous_file(final.parent), None
        except FileNotFoundError:
            self._make_folder(final.parent)
            fd, tmp = _anonymous_file(final.parent), None
        if fd is None:
            self._make_folder(final.parent)
            tmp = self._temp_for(key)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, tmp

    def copy_in(self, key: str, src: Path, expected: Digest, *, syncs: DeferredSyncs | None = None) -> Digest:
        final = self.path(key)
        if final.exists():
            have = digest_file(final)
            if have != expected:
                raise AlreadyExists(f"{key} exists with different content")
            if self.fsync:  # a copy made before a crash may have died before its syncs: sync it all
                self._sync_file_and_folders(final, syncs)
            return have
        self._make_folder(final.parent, syncs)
        if src.stat().st_dev == self._device:
            return self._link_in(final, src, expected, syncs)
        tmp = self._temp_for(key)
        digest = StreamingDigest()
        try:
            with src.open("rb") as fin, tmp.open("xb") as fout:
                while chunk := fin.read(CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                if self.fsync:
                    os.fsync(fout.fileno())
            got = digest.digest()
            if got != expected:
                raise DigestMismatch(f"{src} does not match its recorded checksums")
            try:
                self._publish(tmp, final)
            except AlreadyExists:
                if digest_file(final) != expected:
                    raise
            return got
        finally:
            tmp.unlink(missing_ok=True)

    def _link_in(self, final: Path, src: Path, expected: Digest, syncs: DeferredSyncs | None) -> Digest:
        """`copy_in` within one filesystem (a local quarantine and local trusted storage): the verified
        file gets a second name rather than a second copy. Nothing writes to a file once it is under
        its name (the bridge only creates), so the bytes checked here are the bytes linked."""
        with src.open("rb") as fin:
            got = digest_stream(fin)
            if got != expected:
                raise DigestMismatch(f"{src} does not match its recorded checksums")
            if self.fsync and syncs is None:  # the quarantine may not have synced it (see Gateway.open)
                os.fsync(fin.fileno())
        try:
            os.link(src, final)
        except FileExistsError:
            if digest_file(final) != expected:
                raise AlreadyExists(f"{final.name} exists with different content") from None
            return got
        if self.fsync and syncs is not None:
            syncs.file(final)  # the same file as `src`, under the name it keeps
        self._sync_folder(final.parent, syncs)
        return got

    def stat(self, key: str) -> Digest | None:
        p = self.path(key)
        return digest_file(p) if p.is_file() else None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def open_read(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def delete(self, key: str) -> bool:
        p = self.path(key)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        # Its folder stays, even once empty (a volunteer's quarantine folder is used again by its next
        # task): removing and making folders again costs inodes, see `bridge.quarantine.output_key`.
        return True

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root if not prefix else self.path(prefix)
        if not base.exists():
            return
        for dirpath, dirs, names in os.walk(base):
            dirs[:] = [d for d in dirs if d != STAGING]  # temporaries are never listed
            for n in sorted(names):
                if PARTIAL in n:
                    continue
                yield Path(dirpath, n).relative_to(self.root).as_posix()

    def sweep_partials(self, area: str, older_than_s: float) -> int:
        """Delete temporaries of writes to `area` that died half-way (a crash, a dropped connection):
        one listing of the area's staging folder, however many files the area holds."""
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            entries = list(os.scandir(self.path(f"{area}/{STAGING}")))
        except FileNotFoundError:
            return 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # published or discarded meanwhile
                if PARTIAL in entry.name and entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed
