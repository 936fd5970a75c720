"""BOINC names of Airlock objects, and the capabilities hidden in them.

An Airlock job is a BOINC workunit `airlock_<job>`, a task is a result `airlock_<job>_<task>`. A result's
output is the physical file `airlock_<job>_<task>_<n>_<tag>` (the app opens it under the job's declared
output name): the tag is an HMAC of the task, the output's index and its size cap under the project's
upload key, so only a file the scheduler assigned can be uploaded, and a name cannot be guessed or
forged (BOINC signs an upload certificate for the same purpose). Input files are served under
`<mac>/<sha256>`, so the download server hands out only inputs whose address the scheduler gave.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

PREFIX = "airlock"
_RESULT = re.compile(rf"^{PREFIX}_(\d{{1,10}})_(\d{{1,10}})$")
_OUTPUT = re.compile(rf"^{PREFIX}_(\d{{1,10}})_(\d{{1,10}})_(\d{{1,3}})_([0-9a-f]{{20}})$")
UPLOAD_KEY_FILE = "boinc-upload.key"


def workunit_name(job_id: int) -> str:
    return f"{PREFIX}_{job_id}"


def result_name(job_id: int, task_id: int) -> str:
    return f"{PREFIX}_{job_id}_{task_id}"


_PILOT = re.compile(rf"^{PREFIX}_pilot_(\d{{1,10}})_[0-9a-f]{{8}}$")


def pilot_name(host_id: int) -> str:
    """A vacuum-model pilot: a workunit and result of its own, not an Airlock task."""
    return f"{PREFIX}_pilot_{host_id}_{secrets.token_hex(4)}"


def parse_pilot_name(name: str) -> int | None:
    """The host id a pilot was sent to, or None if `name` is no pilot."""
    m = _PILOT.match(name)
    return int(m[1]) if m else None


def parse_result_name(name: str) -> tuple[int, int] | None:
    """(job id, task id) of one of our result names, or None."""
    m = _RESULT.match(name)
    return (int(m[1]), int(m[2])) if m else None


@dataclass(frozen=True)
class OutputName:
    job_id: int
    task_id: int
    index: int  # the output's position in the job's declared outputs


class NameSigner:
    """Tags names with an HMAC under the project's upload key (a secret of the gateway, never sent)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, *parts: object) -> str:
        msg = "/".join(str(p) for p in parts).encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:20]

    def output_name(self, job_id: int, task_id: int, index: int, max_nbytes: int) -> str:
        tag = self._tag("out", job_id, task_id, index, max_nbytes)
        return f"{PREFIX}_{job_id}_{task_id}_{index}_{tag}"

    def parse_output_name(self, name: str, max_nbytes: int) -> OutputName | None:
        """The output a physical name stands for, if its tag is ours for these values; else None."""
        m = _OUTPUT.match(name)
        if not m:
            return None
        job_id, task_id, index = int(m[1]), int(m[2]), int(m[3])
        if not hmac.compare_digest(m[4], self._tag("out", job_id, task_id, index, max_nbytes)):
            return None
        return OutputName(job_id, task_id, index)

    @staticmethod
    def output_ids(name: str) -> OutputName | None:
        """The ids a physical output name claims (unverified: check the tag before trusting them)."""
        m = _OUTPUT.match(name)
        return OutputName(int(m[1]), int(m[2]), int(m[3])) if m else None

    def input_path(self, sha256: str) -> str:
        return f"{self._tag('in', sha256)}/{sha256}"

    def check_input(self, mac: str, sha256: str) -> bool:
        return hmac.compare_digest(mac, self._tag("in", sha256))


def load_upload_key(keys_dir: Path) -> bytes:
    """The project's upload key, made on first use. Several server processes may race to make it: the
    first link(2) wins and everyone reads the winner's key."""
    path = keys_dir / UPLOAD_KEY_FILE
    if not path.exists():
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = keys_dir / f".{UPLOAD_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) < 32:
        raise RuntimeError(f"{path} is shorter than 32 bytes; remove it to make a new one")
    return key
