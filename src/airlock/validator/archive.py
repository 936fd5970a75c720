"""Archive safety: an output that is an archive must unpack harmlessly.

Refused: absolute paths, `..` components, links (symbolic or hard), devices, FIFOs, and contents whose
unpacked total exceeds a cap (zip bombs). Only the archive's index is read; nothing is unpacked.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from airlock.validator.apps import InvalidResult

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
MAX_MEMBERS = 100_000


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_name(archive: str, member: str) -> None:
    if not member:
        raise InvalidResult(f"{archive}: a member has an empty name")
    if "\\" in member or member.startswith("/") or (len(member) > 1 and member[1] == ":"):
        raise InvalidResult(f"{archive}: member {member!r} has an absolute path")
    if ".." in PurePosixPath(member).parts:
        raise InvalidResult(f"{archive}: member {member!r} climbs out with '..'")


def _members(name: str, path: Path) -> Iterator[tuple[str, int, str | None]]:
    """(member name, unpacked size, why it is not a plain file or directory, or None) for each member."""
    if name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    mode = (info.external_attr >> 16) & 0o170000
                    special = mode and mode not in (0o100000, 0o040000)
                    yield info.filename, info.file_size, "is a link or special file" if special else None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InvalidResult(f"{name}: not a readable zip archive ({exc})") from exc
        return
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for member in tf:
                problem = None
                if member.issym() or member.islnk():
                    problem = "is a link"
                elif member.isdev() or member.isfifo() or not (member.isfile() or member.isdir()):
                    problem = "is a device or special file"
                yield member.name, member.size, problem
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidResult(f"{name}: not a readable tar archive ({exc})") from exc


def check_archive(name: str, path: Path, max_unpacked: int) -> int:
    """Raise InvalidResult if the archive is unsafe; return its unpacked size."""
    total = 0
    for count, (member, size, problem) in enumerate(_members(name, path), 1):
        if count > MAX_MEMBERS:
            raise InvalidResult(f"{name}: more than {MAX_MEMBERS} members")
        _check_member_name(name, member)
        if problem is not None:
            raise InvalidResult(f"{name}: member {member!r} {problem}")
        total += size
        if total > max_unpacked:
            raise InvalidResult(f"{name}: unpacks to more than {max_unpacked} bytes")
    return total
