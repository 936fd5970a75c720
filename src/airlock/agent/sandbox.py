"""The sandbox: how the agent runs an untrusted payload (a task's command) on the volunteer's computer.

A *task* is one attempt at a job, leased to this host. Its payload is untrusted code, and the volunteer's
machine must be protected from it — and the agent's secrets (the access token, the password) from the
payload. The sandbox is bubblewrap (`bwrap`):

* every namespace unshared (`--unshare-all`): no network at all, its own PIDs (the agent's processes, and
  their command lines and environments, are invisible), its own IPC and hostname;
* the system read-only: each top-level entry of `/` is bind-mounted read-only onto a fresh root, which is
  itself remounted read-only at the end;
* the volunteer's private areas hidden behind empty tmpfs mounts: /root, /home, /tmp, /var/tmp, /run (which
  holds sockets such as docker's, reachable even on a read-only mount) and the agent's own work directory
  (its state file and the other tasks). The agent's interpreter (`sys.prefix`, `sys.base_prefix`) is bound
  back read-only if it lives in a hidden area, so `python3` works inside;
* the task directory bound writable at `/airlock/task` — the only persistent writable place — and made the
  working directory and HOME;
* a clean environment: PATH (the agent's interpreter directory first, so `python3` is the agent's own
  Python with its numpy and uproot), HOME, the job's `env` and AIRLOCK_TASK_ID;
* `--die-with-parent` and `--new-session` (no TIOCSTI on the agent's terminal);
* when the agent runs as root, the payload runs as `nobody` (65534): bwrap keeps only CAP_SETUID and
  CAP_SETGID, and a shim inside the sandbox drops to nobody (losing every capability) before it execs the
  command — so even files the mounts leave visible but root-only (/etc/shadow, host keys) are unreadable.

Limits (see `Limits.for_resources`) are set with setrlimit by a tiny exec shim (a fresh `python -I -S`
that sets them and execs), because `preexec_fn` is unsafe in a threaded program:

* RLIMIT_CPU = 4 x runtime_s x cores (per process; SIGXCPU then SIGKILL 5 s later);
* RLIMIT_AS = memory_mb + max(memory_mb, 1 GiB) of headroom: address space is not resident memory —
  interpreters map shared libraries, thread stacks and malloc arenas they never touch — so the limit is
  generous and stops runaway allocations rather than enforcing the estimate exactly;
* RLIMIT_FSIZE = disk_mb (largest file the payload may write), RLIMIT_CORE = 0;
* RLIMIT_NPROC = 4096 when the payload runs as `nobody` (not set for root, where it is not enforced and
  counts every root process of the host);
* a wall-clock limit of 4 x runtime_s, after which the whole process group is killed.

A payload stopped by the CPU or wall-clock limit exits with 197, BOINC's EXIT_TIME_LIMIT_EXCEEDED.

`--no-sandbox` skips bwrap (with a loud warning) and runs the command directly in the task directory with
the same limits and environment: for machines without user namespaces, and never for untrusted work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from airlock.core.schemas import Resources

log = logging.getLogger(__name__)

TASK_MOUNT = "/airlock/task"
EXIT_TIME_LIMIT = 197  # BOINC's EXIT_TIME_LIMIT_EXCEEDED
STDERR_TAIL_BYTES = 64 * 1024
NOBODY = 65534
MIB = 1 << 20
HIDDEN_AREAS: tuple[str, ...] = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/var/run")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_POLL_S = 0.05

# Outside the sandbox: sets the limits, then execs argv[2:] (bwrap, or the command with --no-sandbox).
_LIMIT_SHIM = r"""
import json, os, resource, sys
for name, soft, hard in json.loads(sys.argv[1]):
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.execvp(sys.argv[2], sys.argv[2:])
"""
# Inside the sandbox: optionally drops from root to an unprivileged uid (clearing every capability),
# runs the command as its child and writes the child's CPU time to a pipe: bwrap does not wait for its
# pid-namespace init, so the agent's own wait4 cannot see the payload's resource usage.
_INNER_SHIM = r"""
import json, os, sys
uid, fd, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
pid = os.fork()
if pid == 0:
    try:
        os.close(fd)
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"airlock: cannot run {argv[0]}: {exc.strerror}\n".encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
os.write(fd, json.dumps([ru.ru_utime, ru.ru_stime]).encode())
os.close(fd)
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


class SandboxError(RuntimeError):
    """bwrap is missing or cannot create a sandbox on this machine."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one payload run."""

    cpu_s: int
    wall_s: float
    address_space_bytes: int
    file_size_bytes: int

    @classmethod
    def for_resources(cls, r: Resources) -> Limits:
        memory = r.memory_mb * MIB
        return cls(
            cpu_s=4 * r.runtime_s * r.cores,
            wall_s=4.0 * r.runtime_s,
            address_space_bytes=memory + max(memory, 1024 * MIB),
            file_size_bytes=r.disk_mb * MIB,
        )


@dataclass(frozen=True, slots=True)
class PayloadResult:
    """How a payload run ended. `aborted` means it was killed on request (lease gone, agent stopping)."""

    exit_code: int
    cpu_time_s: float
    wall_time_s: float
    stderr_tail: str
    time_limited: bool = False
    aborted: bool = False


def interpreter_dir() -> str:
    """The directory of the agent's own `python3` (in a venv: the venv's bin, not the base install's)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def payload_env(job_env: Mapping[str, str], task_id: int, home: str) -> dict[str, str]:
    """The payload's whole environment: nothing of the agent's leaks in (no token, no password)."""
    env = {"PATH": f"{interpreter_dir()}:{SYSTEM_PATH}", "HOME": home, "LANG": "C.UTF-8"}
    for key, value in job_env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"invalid environment variable {key!r} in the job")
        env[key] = value
    env["AIRLOCK_TASK_ID"] = str(task_id)
    return env


def _under(path: str, area: str) -> bool:
    return path == area or path.startswith(area.rstrip("/") + "/")


def read_tail(path: Path, limit: int = STDERR_TAIL_BYTES) -> str:
    """The last `limit` bytes of a file as text (never more than `limit` characters)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _read_usage(fd: int) -> float:
    """CPU seconds the inner shim reported (0 if it was killed before it could)."""
    data = b""
    while select.select([fd], [], [], 2.0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        user, system = json.loads(data)
        return float(user) + float(system)
    except (ValueError, TypeError):
        return 0.0


class Sandbox:
    """Runs payloads in bubblewrap (or, with `enabled=False`, directly — see the module docstring).

    `work_root` is the agent's work directory: hidden inside the sandbox. Call `probe()` once before use.
    """

    def __init__(self, work_root: Path, *, enabled: bool = True, bwrap: str | None = None) -> None:
        self.work_root = work_root.resolve()
        self.enabled = enabled
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        # Set by probe(): the uid the payload runs as (None: the agent's own).
        self.run_as: int | None = None

    # ---------------------------------------------------------------------------------------- setup

    def probe(self) -> None:
        """Check that a trivial sandbox works; pick the unprivileged mode when possible.

        Raises SandboxError with the reason when bwrap is missing or fails."""
        if not self.enabled:
            return
        if not os.path.exists(self.bwrap) or not os.access(self.bwrap, os.X_OK):
            raise SandboxError(f"bubblewrap not found ({self.bwrap}); install the 'bubblewrap' package")
        probe_dir = self.work_root / "probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_dir.mkdir(parents=True)
        candidates: list[int | None] = [NOBODY, None] if os.geteuid() == 0 else [None]
        errors: list[str] = []
        try:
            for uid in candidates:
                self.run_as = uid
                if uid is not None:
                    os.chown(probe_dir, uid, uid)
                limits = Limits(cpu_s=30, wall_s=30.0, address_space_bytes=2048 * MIB, file_size_bytes=MIB)
                result = self.run(0, probe_dir, ["/bin/sh", "-c", "exit 0"], {}, limits)
                if result.exit_code == 0:
                    who = "nobody" if uid is not None else "the agent's user"
                    log.info("sandbox: bubblewrap works (payloads run as %s)", who)
                    return
                errors.append(f"exit {result.exit_code}: {result.stderr_tail.strip()[-500:]}")
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
        self.run_as = None
        raise SandboxError("bubblewrap cannot create a sandbox here: " + "; ".join(errors))

    def prepare_task_dir(self, task_dir: Path) -> None:
        """Make the task directory writable by the payload's user."""
        if self.enabled and self.run_as is not None:
            os.chown(task_dir, self.run_as, self.run_as)

    def bwrap_argv(
        self, task_dir: Path, argv: Sequence[str], env: Mapping[str, str], usage_fd: int = 2
    ) -> list[str]:
        """The bwrap command line that runs `argv` in `task_dir` (mounted at /airlock/task); the payload's
        CPU time is written to `usage_fd` as JSON [user, system] when it ends."""
        hidden = [*HIDDEN_AREAS]
        work = str(self.work_root)
        if not any(_under(work, area) for area in hidden):
            hidden.append(work)
        out = [self.bwrap, "--die-with-parent", "--new-session"]
        if self.run_as is None:
            out.append("--unshare-all")
        else:
            # root without a user namespace (so setuid to nobody works), every other namespace unshared
            out += [
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]
            out += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        for entry in sorted(os.listdir("/")):
            path = "/" + entry
            if entry in {"proc", "dev"} or path in hidden:
                continue
            if os.path.islink(path):
                out += ["--symlink", os.readlink(path), path]
            elif os.path.exists(path):
                out += ["--ro-bind", path, path]
        for area in hidden:
            if os.path.islink(area):
                continue  # e.g. /var/run -> /run: already hidden through its target
            if os.path.isdir(area):
                out += ["--tmpfs", area]
        out += ["--dev", "/dev", "--proc", "/proc"]
        # the agent's interpreter, if it lives in a hidden area (pyenv under /root, a venv in /home)
        for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}):
            real = os.path.realpath(prefix)
            for p in sorted({prefix, real}):
                if any(_under(p, area) for area in hidden) and not _under(p, work) and os.path.isdir(p):
                    parents = [str(q) for q in reversed(Path(p).parents) if str(q) != "/"]
                    for parent in parents:  # traversable by the payload's user, whatever the host's modes
                        out += ["--perms", "0755", "--dir", parent]
                    out += ["--ro-bind", p, p]
        out += ["--perms", "0755", "--dir", os.path.dirname(TASK_MOUNT)]
        out += ["--bind", str(task_dir.resolve()), TASK_MOUNT, "--remount-ro", "/", "--chdir", TASK_MOUNT]
        out += ["--clearenv"]
        for key, value in env.items():
            out += ["--setenv", key, value]
        out.append("--")
        uid = -1 if self.run_as is None else self.run_as
        out += [sys.executable, "-I", "-S", "-c", _INNER_SHIM, str(uid), str(usage_fd), *argv]
        return out

    # ------------------------------------------------------------------------------------------ run

    def _rlimits(self, limits: Limits) -> list[tuple[str, int, int]]:
        rl = [
            ("RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 5),
            ("RLIMIT_AS", limits.address_space_bytes, limits.address_space_bytes),
            ("RLIMIT_FSIZE", limits.file_size_bytes, limits.file_size_bytes),
            ("RLIMIT_CORE", 0, 0),
        ]
        if self.enabled and self.run_as is not None:
            rl.append(("RLIMIT_NPROC", 4096, 4096))
        return rl

    def run(
        self,
        task_id: int,
        task_dir: Path,
        argv: Sequence[str],
        job_env: Mapping[str, str],
        limits: Limits,
        abort: threading.Event | None = None,
        log_dir: Path | None = None,
    ) -> PayloadResult:
        """Run `argv` for a task and wait for it; kill its process group on timeout or when `abort` is set.

        stdout and stderr go to `<log_dir>/<task_id>.stdout|.stderr` (default: next to the task directory,
        outside what the payload can see)."""
        if not argv:
            raise ValueError("empty command")
        log_dir = log_dir or task_dir.parent
        home = TASK_MOUNT if self.enabled else str(task_dir.resolve())
        env = payload_env(job_env, task_id, home)
        usage_r, usage_w = os.pipe()
        if self.enabled:
            target = self.bwrap_argv(task_dir, argv, env, usage_w)
            popen_env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
            cwd = "/"
        else:
            target = list(argv)
            popen_env = env
            cwd = str(task_dir.resolve())
        shim = [sys.executable, "-I", "-S", "-c", _LIMIT_SHIM, json.dumps(self._rlimits(limits)), *target]
        stderr_path = log_dir / f"{task_id}.stderr"
        started = time.monotonic()
        try:
            with (log_dir / f"{task_id}.stdout").open("wb") as out, stderr_path.open("wb") as err:
                proc = subprocess.Popen(
                    shim,
                    cwd=cwd,
                    env=popen_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(usage_w,) if self.enabled else (),
                )
        finally:
            os.close(usage_w)
        try:
            status, rusage, timed_out, aborted = self._wait(proc, started + limits.wall_s, abort)
            wall = time.monotonic() - started
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code
            cpu = max(rusage.ru_utime + rusage.ru_stime, _read_usage(usage_r))
        finally:
            os.close(usage_r)
        note = ""
        # The kernel sends SIGXCPU at RLIMIT_CPU's soft limit, SIGKILL at the hard one. The CPU time
        # the rusage reports is scaled from tick samples and may be under the kernel's own count
        # (0.92 s at a 1 s limit on a loaded machine), hence the margins; a payload that kills itself
        # with either signal long before the limit keeps its own exit code.
        cpu_limited = (code in (-signal.SIGXCPU, 128 + signal.SIGXCPU) and cpu >= limits.cpu_s * 0.5) or (
            code in (-signal.SIGKILL, 128 + signal.SIGKILL) and cpu >= limits.cpu_s * 0.95
        )
        if timed_out:
            note = f"\nairlock: wall-clock limit of {limits.wall_s:g} s exceeded; payload killed\n"
            code = EXIT_TIME_LIMIT
        elif cpu_limited:
            note = f"\nairlock: CPU time limit of {limits.cpu_s} s exceeded; payload killed\n"
            code = EXIT_TIME_LIMIT
        tail = read_tail(stderr_path) + note
        return PayloadResult(
            exit_code=code,
            cpu_time_s=cpu,
            wall_time_s=wall,
            stderr_tail=tail[-STDERR_TAIL_BYTES:],
            time_limited=bool(note),
            aborted=aborted,
        )

    @staticmethod
    def _wait(
        proc: subprocess.Popen[bytes], deadline: float, abort: threading.Event | None
    ) -> tuple[int, resource.struct_rusage, bool, bool]:
        timed_out = aborted = False
        killed = False
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                return status, rusage, timed_out, aborted
            if not killed:
                if abort is not None and abort.is_set():
                    aborted = killed = True
                elif time.monotonic() > deadline:
                    timed_out = killed = True
                if killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            if abort is not None and not killed:
                abort.wait(_POLL_S)
            else:
                time.sleep(_POLL_S)
