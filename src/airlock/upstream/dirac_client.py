"""Typed client of the DIRAC worker (``dirac_worker.py``), which runs under DIRAC's own python.

The worker speaks JSON lines on its stdin/stdout; this client starts it, sends one request per call,
matches the reply by id, raises :class:`DiracError` when the worker answers ``ok: false`` and
:class:`DiracTimeout` when no answer comes in time (the worker is then stopped and started afresh on the
next call, since its requests are served one after another).

    client = DiracClient.from_dir("/path/to/dirac")        # reads DIR/dirac.json written by up.sh
    job = client.match()
    ...
    client.close()
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

WORKER = Path(__file__).with_name("dirac_worker.py")

JsonScalar = str | int | float | bool

# DIRAC's status columns (JobDB.Jobs, JobLoggingDB.LoggingInfo): MinorStatus VARCHAR(128), ApplicationStatus
# VARCHAR(255). ``set_status`` cuts longer texts with :func:`fit_status` (and the worker applies the same
# rule again), so no caller can make MySQL refuse the update (error 1406, "Data too long").
MINOR_STATUS_MAX = 128
APPLICATION_STATUS_MAX = 255


def fit_status(text: str, limit: int) -> str:
    """The rule for DIRAC's status columns: a text longer than ``limit`` characters becomes its first
    ``limit - 3`` characters followed by "..."; a shorter one is kept as it is."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DiracError(Exception):
    """DIRAC (or the worker) refused or failed an operation."""

    def __init__(self, op: str, message: str) -> None:
        super().__init__(f"DIRAC {op}: {message}")
        self.op = op
        self.message = message


class DiracTimeout(DiracError):
    """The worker did not answer in time."""


@dataclass(frozen=True)
class JobState:
    status: str | None
    minor_status: str | None
    application_status: str | None


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | str | None:
    """A JDL integer as the worker passes it: int, its raw text when it is not a number (refused by the
    translation), or None when absent."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return str(value)


@dataclass(frozen=True)
class MatchedJob:
    """A job the DIRAC Matcher handed to the gateway (its status is then Matched)."""

    job_id: int
    jdl: str
    owner: str | None
    owner_group: str | None
    owner_dn: str | None
    vo: str | None
    executable: str | None
    arguments: str | None
    input_sandbox: tuple[str, ...]
    input_sandbox_pfns: tuple[str, ...]
    input_data: tuple[str, ...]
    output_sandbox: tuple[str, ...]
    output_data: tuple[str, ...]
    output_se: tuple[str, ...]
    output_path: str | None
    cpu_time: int | None
    job_name: str | None
    job_type: str | None
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # requirements and redirections, parsed from the JDL by the worker (DIRAC's ClassAd)
    number_of_processors: int | str | None = None
    min_number_of_processors: int | str | None = None
    max_number_of_processors: int | str | None = None
    tags: tuple[str, ...] = ()  # Tags and Tag together (DIRAC's optimizers add nProcessors/MultiProcessor)
    std_output: str | None = None
    std_error: str | None = None
    platform: str | None = None

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> MatchedJob:
        f: Mapping[str, Any] = reply.get("fields") or {}
        cpu = f.get("CPUTime")
        return cls(
            job_id=int(reply["job_id"]),
            jdl=str(reply.get("jdl") or ""),
            owner=_opt_str(reply.get("owner")),
            owner_group=_opt_str(reply.get("owner_group")),
            owner_dn=_opt_str(reply.get("owner_dn")),
            vo=_opt_str(reply.get("vo")),
            executable=_opt_str(f.get("Executable")),
            arguments=_opt_str(f.get("Arguments")),
            input_sandbox=_strs(f.get("InputSandbox")),
            input_sandbox_pfns=_strs(reply.get("input_sandbox_pfns")),
            input_data=_strs(f.get("InputData")),
            output_sandbox=_strs(f.get("OutputSandbox")),
            output_data=_strs(f.get("OutputData")),
            output_se=_strs(f.get("OutputSE")),
            output_path=_opt_str(f.get("OutputPath")),
            cpu_time=int(cpu) if isinstance(cpu, int | float) else None,
            job_name=_opt_str(f.get("JobName")),
            job_type=_opt_str(f.get("JobType")),
            fields=dict(f),
            number_of_processors=_opt_int(f.get("NumberOfProcessors")),
            min_number_of_processors=_opt_int(f.get("MinNumberOfProcessors")),
            max_number_of_processors=_opt_int(f.get("MaxNumberOfProcessors")),
            tags=tuple(dict.fromkeys([*_strs(f.get("Tags")), *_strs(f.get("Tag"))])),
            std_output=_opt_str(f.get("StdOutput")) or None,
            std_error=_opt_str(f.get("StdError")) or None,
            platform=_opt_str(f.get("Platform")) or None,
        )


@dataclass(frozen=True)
class InputSizes:
    """Sizes in bytes of a job's inputs as DIRAC knows them before any download: a sandbox PFN's packed
    archive, an LFN's catalog size. ``None`` where DIRAC could not tell (the reason is in ``errors``)."""

    sizes: Mapping[str, int | None]
    how: Mapping[str, str] = field(default_factory=dict)  # SandboxMetadataDB, StorageElement, FileCatalog
    errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def known_total(self) -> int:
        return sum(v for v in self.sizes.values() if v is not None)

    @property
    def unknown(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.sizes.items() if v is None)


def _state(value: Any) -> JobState:
    v: Mapping[str, Any] = value if isinstance(value, dict) else {}
    return JobState(
        status=_opt_str(v.get("Status")),
        minor_status=_opt_str(v.get("MinorStatus")),
        application_status=_opt_str(v.get("ApplicationStatus")),
    )


class DiracClient:
    """Runs ``dirac_worker.py`` with ``python`` (DIRAC's venv) and ``env`` (added to this process's)."""

    def __init__(
        self,
        python: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        *,
        timeout: float = 120.0,
        worker: str | os.PathLike[str] = WORKER,
        stderr: str | os.PathLike[str] | None = None,
    ) -> None:
        self.python = str(python)
        self.env = dict(env or {})
        self.timeout = timeout
        self.worker = str(worker)
        self.stderr_path = None if stderr is None else str(stderr)
        self._proc: subprocess.Popen[str] | None = None
        self._stderr_file: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # one writer at a time, and process (re)starts
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._eof = threading.Event()  # set by the current worker's reader when its stdout closes
        self._next_id = 0
        self._closed = False

    @classmethod
    def from_dir(
        cls, dirac_dir: str | os.PathLike[str], *, timeout: float = 120.0, stderr: str | None = None
    ) -> DiracClient:
        """A client of the local DIRAC that ``scripts/dirac/up.sh DIR`` brought up (reads DIR/dirac.json)."""
        info = json.loads((Path(dirac_dir) / "dirac.json").read_text())
        return cls(info["python"], info["env"], timeout=timeout, stderr=stderr)

    # ------------------------------------------------------------ process

    def _start(self) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "DIRAC"))}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.stderr_path is not None:
            self._stderr_file = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in _stop
        proc = subprocess.Popen(
            [self.python, self.worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        with self._cond:
            self._replies.clear()
        self._eof = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(proc, self._eof), name="dirac-worker-reader", daemon=True
        )
        self._reader.start()
        return proc

    def _read(self, proc: subprocess.Popen[str], eof: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours: the worker keeps its stdout for replies only
            rid = msg.get("id") if isinstance(msg, dict) else None
            if isinstance(rid, int):
                with self._cond:
                    self._replies[rid] = msg
                    self._cond.notify_all()
        with self._cond:
            eof.set()
            self._cond.notify_all()

    def _stop(self, proc: subprocess.Popen[str], grace: float) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def close(self) -> None:
        """Stop the worker (EOF on its stdin, then terminate/kill if it does not exit)."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            if proc is not None:
                self._stop(proc, grace=10)
            if self._reader is not None:
                self._reader.join(timeout=5)

    def __enter__(self) -> DiracClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; returns ``result`` or raises DiracError."""
        wait = self.timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                raise DiracError(op, "client is closed")
            if self._proc is None or self._proc.poll() is not None or self._eof.is_set():
                if self._proc is not None:
                    self._stop(self._proc, grace=0)
                self._proc = self._start()
            proc, eof = self._proc, self._eof
            self._next_id += 1
            rid = self._next_id
            line = json.dumps({"id": rid, "op": op, "args": dict(args or {})}) + "\n"
            try:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise DiracError(op, f"worker is not running ({exc})") from exc
        with self._cond:
            done = self._cond.wait_for(lambda: rid in self._replies or eof.is_set(), timeout=wait)
            reply = self._replies.pop(rid, None)
        if reply is None:
            if not done:
                with self._lock:  # a stuck worker: stop it, the next call starts a fresh one
                    if self._proc is proc:
                        self._proc = None
                        self._stop(proc, grace=0)
                raise DiracTimeout(op, f"no answer within {wait:.0f}s")
            raise DiracError(op, f"worker exited (status {proc.poll()}) before answering")
        if not reply.get("ok"):
            raise DiracError(op, str(reply.get("error") or "unknown error"))
        return reply.get("result")

    def ping(self) -> dict[str, Any]:
        result = self.call("ping", timeout=min(self.timeout, 30.0))
        return dict(result) if isinstance(result, dict) else {}

    def match(self, resource: Mapping[str, JsonScalar | Sequence[str]] | None = None) -> MatchedJob | None:
        """Ask the Matcher for a job for this resource (Site, GridCE, CPUTime, ... default to the gateway's
        BOINC site); None when no job matches."""
        result = self.call("match", {"resource": dict(resource or {})})
        return None if result is None else MatchedJob.from_reply(result)

    def parse_jdl(self, jdl: str) -> dict[str, Any]:
        """The parsed fields the worker gives a matched job (``MatchedJob.fields``) for this JDL."""
        result = self.call("parse_jdl", {"jdl": jdl})
        return dict(result) if isinstance(result, dict) else {}

    def input_sizes(self, pfns: Sequence[str] = (), lfns: Sequence[str] = ()) -> InputSizes:
        """Sizes of input sandboxes ("SB:..." PFNs) and input files (LFNs, without "LFN:") from DIRAC's
        metadata (SandboxMetadataDB or the sandbox SE; the file catalog), downloading nothing."""
        result = self.call("input_sizes", {"pfns": list(pfns), "lfns": list(lfns)})
        r: Mapping[str, Any] = result if isinstance(result, dict) else {}
        return InputSizes(
            sizes={str(k): (None if v is None else int(v)) for k, v in (r.get("sizes") or {}).items()},
            how={str(k): str(v) for k, v in (r.get("how") or {}).items()},
            errors={str(k): str(v) for k, v in (r.get("errors") or {}).items()},
        )

    def download_sandbox(self, pfn: str, dest_dir: str | os.PathLike[str]) -> list[str]:
        """Download and unpack an input sandbox ("SB:SE|path") into dest_dir; returns the new names."""
        result = self.call("download_sandbox", {"pfn": pfn, "dest_dir": os.fspath(dest_dir)})
        return [str(f) for f in result["files"]]

    def get_file(
        self, lfn: str, dest_dir: str | os.PathLike[str], owner_proxy: str | os.PathLike[str] | None = None
    ) -> Path:
        args: dict[str, Any] = {"lfn": lfn, "dest_dir": os.fspath(dest_dir)}
        if owner_proxy is not None:
            args["owner_proxy"] = os.fspath(owner_proxy)
        return Path(self.call("get_file", args)["path"])

    def set_status(
        self, job_id: int, status: str = "", minor: str = "", application: str | None = None
    ) -> JobState:
        """Set the job's status/minor status and/or application status; returns the state DIRAC then holds
        (DiracError if DIRAC did not take the new status). The minor status is cut to 128 characters and
        the application status to 255 (:func:`fit_status`), the widths of DIRAC's columns."""
        args: dict[str, Any] = {
            "job_id": job_id,
            "status": status,
            "minor": fit_status(minor, MINOR_STATUS_MAX),
        }
        if application is not None:
            args["application"] = fit_status(application, APPLICATION_STATUS_MAX)
        return _state(self.call("set_status", args))

    def set_parameters(self, job_id: int, params: Mapping[str, JsonScalar]) -> None:
        self.call("set_parameters", {"job_id": job_id, "params": dict(params)})

    def heartbeat(
        self,
        job_id: int,
        metrics: Mapping[str, JsonScalar] | None = None,
        static: Mapping[str, JsonScalar] | None = None,
    ) -> dict[str, str]:
        """Send a heartbeat; returns the commands DIRAC has for the job (e.g. {"Kill": ""})."""
        result = self.call(
            "heartbeat", {"job_id": job_id, "metrics": dict(metrics or {}), "static": dict(static or {})}
        )
        return {str(k): str(v) for k, v in (result or {}).items()}

    def upload_output_sandbox(
        self, job_id: int, files: Sequence[str | os.PathLike[str]], owner_proxy: str | os.PathLike[str]
    ) -> str:
        """Upload files as the job's output sandbox, as the owner (their proxy is used for this call only);
        returns the sandbox PFN."""
        result = self.call(
            "upload_output_sandbox",
            {"job_id": job_id, "files": [os.fspath(f) for f in files], "owner_proxy": os.fspath(owner_proxy)},
        )
        return str(result["pfn"])

    def output_sandboxes(self, job_id: int, owner_proxy: str | os.PathLike[str] | None = None) -> list[str]:
        """The PFNs of the sandboxes assigned to the job as Output (as the owner, when given their proxy:
        the owner sees the sandboxes uploaded in their name); sorted, each once."""
        args: dict[str, Any] = {"job_id": job_id}
        if owner_proxy is not None:
            args["owner_proxy"] = os.fspath(owner_proxy)
        result = self.call("output_sandboxes", args)
        return [str(p) for p in (result or {}).get("pfns", [])]

    def put_and_register(
        self,
        lfn: str,
        path: str | os.PathLike[str],
        se: str,
        owner_proxy: str | os.PathLike[str] | None = None,
    ) -> None:
        args: dict[str, Any] = {"lfn": lfn, "path": os.fspath(path), "se": se}
        if owner_proxy is not None:
            args["owner_proxy"] = os.fspath(owner_proxy)
        self.call("put_and_register", args)

    def get_replicas(self, lfn: str) -> dict[str, str]:
        """{storage element: PFN} of the LFN's replicas."""
        result = self.call("get_replicas", {"lfn": lfn})
        return {str(k): str(v) for k, v in (result or {}).items()}

    def reschedule(self, job_id: int) -> None:
        """Send the job back to DIRAC's queue (Received -> optimizers -> Waiting)."""
        self.call("reschedule", {"job_id": job_id})

    def job_status(self, job_id: int) -> JobState:
        return _state(self.call("job_status", {"job_id": job_id}))
