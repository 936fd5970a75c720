"""LocalStorage receives into an unnamed file (O_TMPFILE) and names it only when published; where the
filesystem has no unnamed files it falls back to a hidden temporary name. Both are create-only and leave
nothing behind when the upload fails."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.core.checksums import digest_bytes
from airlock.core.errors import TooLarge
from airlock.storage import local
from airlock.storage.base import STAGING, AlreadyExists, DeferredSyncs
from airlock.storage.local import LocalStorage


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _everything(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["anonymous", "named"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStorage:
    if request.param == "named":
        monkeypatch.setattr(local, "_anonymous_file", lambda folder: None)
    s = LocalStorage(tmp_path / "root", fsync=True)
    s.mode = request.param  # type: ignore[attr-defined]
    return s


def test_received_file_appears_only_when_published_and_never_twice(storage: LocalStorage) -> None:
    key = "quarantine/1/2/out.txt"
    pending = asyncio.run(storage.receive(key, _chunks(b"hello ", b"world\n"), max_size=100))
    assert pending.digest == digest_bytes(b"hello world\n")
    before = _everything(storage.root)
    if storage.mode == "anonymous":  # type: ignore[attr-defined]
        assert before == []  # not even a temporary name
    else:
        # a temporary name in the area's staging folder (where the janitor looks), never the key
        assert len(before) == 1 and before[0].startswith(f"quarantine/{STAGING}/")
        assert local.PARTIAL in before[0] and list(storage.list("quarantine")) == []
    assert not storage.exists(key)
    pending.publish()
    assert _everything(storage.root) == [key]
    assert storage.open_read(key).read() == b"hello world\n"

    again = asyncio.run(storage.receive(key, _chunks(b"other bytes\n"), max_size=100))
    with pytest.raises(AlreadyExists):
        again.publish()
    assert _everything(storage.root) == [key]  # the loser left nothing, the first file is intact
    assert storage.open_read(key).read() == b"hello world\n"


def test_failed_or_discarded_receive_leaves_nothing(storage: LocalStorage) -> None:
    with pytest.raises(TooLarge):
        asyncio.run(storage.receive("quarantine/1/3/out.txt", _chunks(b"x" * 60, b"x" * 60), max_size=100))
    pending = asyncio.run(storage.receive("quarantine/1/4/out.txt", _chunks(b"fine\n"), max_size=100))
    pending.discard()
    assert _everything(storage.root) == []


def test_an_upload_cancelled_while_its_file_is_opened_leaves_no_file_open(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder and file are made in a worker thread; an upload cancelled meanwhile (the client went
    away) must not leak the descriptor or leave the hidden temporary name behind."""
    opening, release = threading.Event(), threading.Event()
    made: list[tuple[int, Path | None]] = []
    real = storage._pending_file

    def slow(key: str, final: Path) -> tuple[int, Path | None]:
        opening.set()
        release.wait(10)
        made.append(real(key, final))
        return made[-1]

    monkeypatch.setattr(storage, "_pending_file", slow)

    async def main() -> None:
        upload = asyncio.create_task(storage.receive("quarantine/1/2/out.txt", _chunks(b"x"), max_size=10))
        while not opening.is_set():
            await asyncio.sleep(0.001)
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload
        release.set()
        for _ in range(1000):  # the thread finishes, then the loop runs the clean-up
            if made and not Path(f"/proc/self/fd/{made[0][0]}").exists():
                break
            await asyncio.sleep(0.005)

    asyncio.run(main())
    assert made, "the file was never opened"
    fd, _tmp = made[0]
    assert not Path(f"/proc/self/fd/{fd}").exists(), "the pending file's descriptor was left open"
    assert _everything(storage.root) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_an_uploads_file_is_opened_in_a_thread_only_when_that_may_wait_on_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """With fsync a new folder is synced in its parent before the file goes in: that may wait on the
    disk, so not on the event loop. Without, handing two inode allocations to a thread costs the loop
    more than it saves (the thread takes the GIL from it): they are made on the loop."""
    storage = LocalStorage(tmp_path / "root", fsync=fsync)
    opened_on: list[int] = []
    real = storage._pending_file

    def record(key: str, final: Path) -> tuple[int, Path | None]:
        opened_on.append(threading.get_ident())
        return real(key, final)

    monkeypatch.setattr(storage, "_pending_file", record)

    async def main() -> int:
        pending = await storage.receive("quarantine/1/2/out.txt", _chunks(b"data\n"), max_size=10)
        pending.publish()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert (opened_on[0] != loop_thread) is fsync
    assert (storage.root / "quarantine/1/2/out.txt").read_bytes() == b"data\n"


def _record_folder_syncs(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[tuple[str, list[str]]]:
    """Each folder fsync as (folder, what was in it then), relative to `root`."""
    synced: list[tuple[str, list[str]]] = []
    real = local._fsync_dir

    def record(path: Path) -> None:
        inside = sorted(p.relative_to(root).as_posix() for p in path.iterdir() if p.name != STAGING)
        synced.append((path.relative_to(root).as_posix(), inside))
        real(path)

    monkeypatch.setattr(local, "_fsync_dir", record)
    return synced


def test_a_folder_made_for_a_file_is_synced_in_its_parent_before_the_file_goes_in(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fsyncing a file and its folder does not make new folders above it survive a power cut: each
    folder made on the way is synced in its parent first, and only new folders cost a sync."""
    synced = _record_folder_syncs(monkeypatch, storage.root)
    asyncio.run(storage.receive("quarantine/7/8/out.txt", _chunks(b"data\n"), max_size=100)).publish()
    assert synced == [
        (".", ["quarantine"]),
        ("quarantine", ["quarantine/7"]),
        ("quarantine/7", ["quarantine/7/8"]),  # the task's folder, still empty
        ("quarantine/7/8", ["quarantine/7/8/out.txt"]),  # the file's name, once published
    ]

    synced.clear()  # the assimilator's copy: a job's new folder in an existing batch folder
    (storage.root / "trusted" / "3").mkdir(parents=True)
    assert storage.copy_in(
        "trusted/3/9/out.txt", storage.root / "quarantine/7/8/out.txt", digest_bytes(b"data\n")
    )
    assert synced == [("trusted/3", ["trusted/3/9"]), ("trusted/3/9", ["trusted/3/9/out.txt"])]

    synced.clear()  # a second output into the task's existing folder: only that folder
    asyncio.run(storage.receive("quarantine/7/8/log.txt", _chunks(b"log\n"), max_size=100)).publish()
    assert synced == [("quarantine/7/8", ["quarantine/7/8/log.txt", "quarantine/7/8/out.txt"])]


def test_a_batch_of_copies_syncs_nothing_until_flushed_then_each_file_and_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assimilator's batches: each copy adds what it must sync to the batch's DeferredSyncs, and
    `flush` syncs it all, every folder once, however many jobs' folders went into it."""
    storage = LocalStorage(tmp_path / "root", fsync=True)
    src = {}
    for i in range(3):
        src[i] = storage.root / f"quarantine/7/{i}/out.txt"
        src[i].parent.mkdir(parents=True)
        src[i].write_bytes(b"data %d\n" % i)
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).relative_to(storage.root).as_posix())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    syncs = DeferredSyncs()
    for i in range(3):
        storage.copy_in(f"trusted/3/{i}/out.txt", src[i], digest_bytes(b"data %d\n" % i), syncs=syncs)
    assert synced == []  # nothing until the batch is flushed
    syncs.flush()
    files = [f"trusted/3/{i}/out.txt" for i in range(3)]
    folders = [".", "trusted", "trusted/3", *(f"trusted/3/{i}" for i in range(3))]
    assert sorted(synced) == sorted(files + folders)  # each once: trusted/3 not three times
    assert synced[:3] == files  # the files' data first, then the names
    synced.clear()
    syncs.flush()
    assert synced == []  # flushed means forgotten

    # a copy found already made (the batch died before its flush) is made durable all the same
    storage.copy_in("trusted/3/1/out.txt", src[1], digest_bytes(b"data 1\n"), syncs=syncs)
    syncs.flush()
    assert sorted(synced) == sorted(["trusted/3/1/out.txt", ".", "trusted", "trusted/3", "trusted/3/1"])


def test_without_fsync_folders_are_made_and_nothing_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path / "root", fsync=False)
    synced = _record_folder_syncs(monkeypatch, storage.root)
    asyncio.run(storage.receive("quarantine/7/8/out.txt", _chunks(b"data\n"), max_size=100)).publish()
    assert _everything(storage.root) == ["quarantine/7/8/out.txt"] and synced == []


def test_a_folder_removed_between_receive_and_publish_is_made_again(storage: LocalStorage) -> None:
    """An upload's unnamed file is opened in its folder, which is then taken to exist at publishing:
    if it was removed meanwhile (an operator's cleanup), publishing makes it again."""
    key = "quarantine/7/9.out.txt"
    storage.path("quarantine/7").mkdir(parents=True)
    pending = asyncio.run(storage.receive(key, _chunks(b"bytes\n"), max_size=100))
    if storage.mode == "anonymous":  # type: ignore[attr-defined]
        storage.path("quarantine/7").rmdir()  # (an unnamed file is in no folder's listing)
    pending.publish()
    assert storage.open_read(key).read() == b"bytes\n"
    assert _everything(storage.root) == [key]
