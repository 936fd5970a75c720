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
        )


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
        (DiracError if DIRAC did not take the new status)."""
        args: dict[str, Any] = {"job_id": job_id, "status": status, "minor": minor}
        if application is not None:
            args["application"] = application
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
