#!/usr/bin/env python3
"""Airlock's BOINC app: runs one Airlock task inside a BOINC slot. Standard library only.

The BOINC client starts it in the slot directory with the workunit's command line:

    airlock_wrapper.py --job <base64url JSON>    one Airlock task: {command, env, outputs, time_limit_s}
    airlock_wrapper.py --vacuum                  the CMS@home model: run the Airlock agent, which pulls
                                                 tasks itself, with the per-volunteer token the project
                                                 put in the project-specific preferences

Inputs are already in the slot under their open names and the payload writes its outputs there. With
bubblewrap available the payload runs with no network, a read-only system, the BOINC data folder hidden
(it holds the volunteer's account key) and `init_data.xml` blanked; without it, it runs directly under
resource limits, and stderr says so. The payload dies with the wrapper (the client kills the wrapper to
abort a task). It speaks the client's shared-memory channel like the BOINC API: <abort/> kills the
payload at once (no 60 s wait for the client to kill us), <quit/> ends it unfinished, <suspend/> and
<resume/> stop and continue the payload's processes, and the CPU time and progress go back to the client.
Exit codes: the payload's own; 128+N if signal N killed it; BOINC's 197 when the time limit passed, 195
when the payload could not start, 206 for a bad job description. `boinc_finish_called` is written with
the status when the task is over, as boinc_finish() does: without it the client restarts a task that
exited 0.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# BOINC's exit codes (lib/error_numbers.h)
EXIT_ABORTED_BY_CLIENT = 194
EXIT_CHILD_FAILED = 195
EXIT_TIME_LIMIT_EXCEEDED = 197
EXIT_CLIENT_EXITING = 199
EXIT_INIT_FAILURE = 206
PR_SET_PDEATHSIG = 1
MSG_CHANNEL_SIZE = 1024
PROCESS_CONTROL_REQUEST, APP_STATUS = 0, 5  # channels of the client's SHARED_MEM (lib/app_ipc.h)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Stop(Exception):
    """End the wrapper with `status`; `finished` says whether the task is over (write the finish file)."""

    def __init__(self, status: int, finished: bool) -> None:
        super().__init__(status)
        self.status = status
        self.finished = finished


class ClientChannel:
    """The BOINC client's shared memory in the slot (`boinc_mmap_file`): it sends <quit/>, <suspend/>,
    <resume/> and <abort/> here, and shows the CPU time and progress we write back. Each 1 KB channel's
    first byte says whether it holds an unread message."""

    def __init__(self, mem: mmap.mmap) -> None:
        self.mem = mem

    @classmethod
    def open(cls, slot: Path) -> ClientChannel | None:
        path = slot / "boinc_mmap_file"
        try:
            with path.open("r+b") as fh:
                return cls(mmap.mmap(fh.fileno(), 8 * MSG_CHANNEL_SIZE))
        except (OSError, ValueError):
            return None

    def receive(self) -> str | None:
        base = PROCESS_CONTROL_REQUEST * MSG_CHANNEL_SIZE
        if not self.mem[base]:
            return None
        raw = self.mem[base + 1 : base + MSG_CHANNEL_SIZE].split(b"\0", 1)[0]
        self.mem[base] = 0
        return raw.decode(errors="replace")

    def report(self, cpu_s: float, fraction_done: float) -> None:
        base = APP_STATUS * MSG_CHANNEL_SIZE
        if self.mem[base]:
            return  # the client has not read the last one
        msg = (
            f"<current_cpu_time>{cpu_s:f}</current_cpu_time>\n"
            f"<checkpoint_cpu_time>{cpu_s:f}</checkpoint_cpu_time>\n"
            f"<fraction_done>{fraction_done:f}</fraction_done>\n"
        ).encode()[: MSG_CHANNEL_SIZE - 2]
        self.mem[base + 1 : base + 2 + len(msg)] = msg + b"\0"
        self.mem[base] = 1


def process_tree(root: int) -> dict[int, float]:
    """CPU seconds of `root` and every process below it (by parent links in /proc)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return {pid: cpu.get(pid, 0.0) for pid in tree}


def signal_tree(root: int, sig: int) -> None:
    for pid in process_tree(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write(f"[airlock-wrapper {stamp}] {message}\n")
    sys.stderr.flush()


def finish(status: int) -> None:
    """BOINC's boinc_finish(): record the status, then exit with it."""
    Path("boinc_finish_called").write_text(f"{status}\n")
    sys.exit(status)


@dataclass(frozen=True)
class Job:
    command: list[str]
    env: dict[str, str]
    outputs: list[str]
    time_limit_s: float
    memory_mb: int


def decode_job(argv: list[str]) -> Job:
    if "--job" not in argv or argv.index("--job") + 1 >= len(argv):
        raise ValueError("no --job argument")
    raw = argv[argv.index("--job") + 1]
    job = json.loads(base64.urlsafe_b64decode(raw.encode()))
    if not isinstance(job, dict):
        raise ValueError("the job description is not an object")
    command = job.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise ValueError("the job's command is not a list of strings")
    env = job.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("the job's env is not a string map")
    outputs = job.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise ValueError("the job's outputs are not a list of names")
    return Job(
        command=command,
        env=env,
        outputs=outputs,
        time_limit_s=float(job.get("time_limit_s") or 3600),
        memory_mb=int(job.get("memory_mb") or 0),
    )


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the wrapper dies, so an abort kills the payload too."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    os.setsid()


def _limits(memory_mb: int) -> Callable[[], None]:
    def apply() -> None:
        _die_with_parent()
        if memory_mb > 0:  # address space, not RSS: leave room for interpreters' mappings
            limit = 4 * memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def sandbox_argv(slot: Path, argv: list[str], env: dict[str, str]) -> list[str] | None:
    """The bubblewrap command line, or None when bubblewrap is missing or cannot run here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    probe = subprocess.run(
        [bwrap, "--ro-bind", "/", "/", "--unshare-all", "--", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        log(f"bubblewrap cannot run here: {probe.stderr.decode(errors='replace').strip()[:200]}")
        return None
    boinc_dir = slot.parent.parent  # <BOINC data>/slots/<n>
    out = [bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--ro-bind", "/", "/"]
    out += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    if boinc_dir != Path("/") and (boinc_dir / "slots").is_dir():
        out += ["--tmpfs", str(boinc_dir)]  # account files, other projects' data, the GUI RPC password
    out += ["--bind", str(slot), str(slot)]
    if (slot / "init_data.xml").exists():
        out += ["--ro-bind", "/dev/null", str(slot / "init_data.xml")]  # it holds the account key
    out += ["--chdir", str(slot), "--clearenv"]
    for key, value in env.items():
        out += ["--setenv", key, value]
    return [*out, "--", *argv]


def run_task(job: Job) -> int:
    slot = Path.cwd().resolve()
    command, outputs, time_limit = job.command, job.outputs, job.time_limit_s
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(slot),
        "LANG": "C.UTF-8",
        **job.env,
    }
    sandboxed = sandbox_argv(slot, command, env)
    if sandboxed is None:
        log("no sandbox (bubblewrap missing or refused): running the payload directly, with limits")
    else:
        log("sandbox: bubblewrap, no network, read-only system, BOINC folder hidden")
    argv = sandboxed or command
    log(f"running {command!r}, time limit {time_limit:.0f} s")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=slot,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,  # BOINC discards stdout; keep it in stderr.txt
            stderr=sys.stderr,
            preexec_fn=_limits(0 if sandboxed else job.memory_mb),
        )
    except OSError as exc:
        log(f"could not start the payload: {exc}")
        return EXIT_CHILD_FAILED
    try:
        code = supervise(proc, slot, time_limit)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed, cpu = time.monotonic() - started, usage.ru_utime + usage.ru_stime
    if (channel := ClientChannel.open(slot)) is not None:
        channel.report(cpu, 1.0)
    log(f"payload ended: exit code {code}, {elapsed:.1f} s elapsed, {cpu:.1f} s CPU")
    for name in outputs:
        path = slot / name
        log(f"output {name}: " + (f"{path.stat().st_size} bytes" if path.exists() else "MISSING"))
    if code < 0:
        return 128 - code  # killed by signal -code
    return min(code, 255)


def supervise(
    proc: subprocess.Popen[bytes], slot: Path, time_limit: float, tick: Callable[[], None] | None = None
) -> int:
    """Wait for the payload while obeying the client: abort, quit, suspend and resume; the time limit
    counts running time only. Raises Stop when the task ends otherwise than by the payload exiting."""
    channel = ClientChannel.open(slot)
    parent = os.getppid()
    ran, last, suspended, last_status = 0.0, time.monotonic(), False, 0.0
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if not suspended:
            ran += now - last
        last = now
        if ran > time_limit:
            log(f"time limit of {time_limit:.0f} s exceeded: payload killed")
            raise Stop(EXIT_TIME_LIMIT_EXCEEDED, finished=True)
        if os.getppid() != parent:
            log("the BOINC client went away: payload killed, the task stays unfinished")
            raise Stop(EXIT_CLIENT_EXITING, finished=False)
        message = channel.receive() if channel else None
        if message and "<abort/>" in message:
            log("aborted by the BOINC client: payload killed")
            raise Stop(EXIT_ABORTED_BY_CLIENT, finished=False)
        if message and "<quit/>" in message:
            log("the BOINC client asked us to quit: payload killed; the task restarts later")
            raise Stop(0, finished=False)
        if message and "<suspend/>" in message and not suspended:
            signal_tree(proc.pid, signal.SIGSTOP)
            suspended = True
            log("suspended")
        if message and "<resume/>" in message and suspended:
            signal_tree(proc.pid, signal.SIGCONT)
            suspended = False
            log("resumed")
        if tick is not None and now - last_status >= 1.0:
            tick()
        if channel and now - last_status >= 1.0:
            cpu = sum(process_tree(proc.pid).values())
            channel.report(cpu, min(0.99, ran / max(1.0, time_limit / 4)))
            last_status = now


def pilot_settings(slot: Path) -> dict[str, str]:
    """The project's pilot settings from init_data.xml: gateway URL, access token, project folder."""
    root = ET.parse(slot / "init_data.xml").getroot()
    # the client passes the content of <project_specific> as <project_preferences> (older clients: whole)
    prefs = root.find("project_preferences/project_specific")
    if prefs is None:
        prefs = root.find("project_preferences")
    found = {
        "gateway": (prefs.findtext("airlock_gateway") if prefs is not None else None) or "",
        "token": (prefs.findtext("airlock_token") if prefs is not None else None) or "",
        "project_dir": root.findtext("project_dir") or str(slot),
        "host": root.findtext("host_info/domain_name") or "",
    }
    return {k: v.strip() for k, v in found.items()}


def write_token(path: Path, token: str) -> None:
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    tmp.replace(path)


def vacuum(slot: Path, hours: float) -> int:
    """Run the Airlock agent with the token the project put in the project-specific preferences; the
    client rewrites init_data.xml when a later RPC brings a fresh token, and the agent gets it."""
    try:
        pilot = pilot_settings(slot)
    except (OSError, ET.ParseError) as exc:
        log(f"no readable init_data.xml: {exc}")
        return EXIT_INIT_FAILURE
    if not pilot["gateway"] or not pilot["token"]:
        log("the project-specific preferences carry no airlock_gateway/airlock_token")
        return EXIT_INIT_FAILURE
    agent = shutil.which("airlock")
    if agent is None:
        log("the Airlock agent (`airlock`) is not installed on this host")
        return EXIT_CHILD_FAILED
    token_file = slot / "airlock_token"
    write_token(token_file, pilot["token"])
    argv = [agent, "agent", "--server", pilot["gateway"], "--token-file", str(token_file), "--once"]
    argv += ["--work-dir", str(Path(pilot["project_dir"]) / "airlock-agent")]
    argv += ["--host-name", f"{pilot['host'] or 'boinc host'} (BOINC pilot)"]
    log(f"vacuum mode: running the Airlock agent against {pilot['gateway']}")
    proc = subprocess.Popen(argv, cwd=slot, stdin=subprocess.DEVNULL, preexec_fn=_limits(0))

    def refresh() -> None:
        try:
            token = pilot_settings(slot)["token"]
        except (OSError, ET.ParseError):
            return
        if token and token != pilot["token"]:
            pilot["token"] = token
            write_token(token_file, token)
            log("a fresh access token came with the project's preferences")

    try:
        code = supervise(proc, slot, hours * 3600, refresh)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
        token_file.unlink(missing_ok=True)
    log(f"the agent ended with exit code {code}")
    return 128 - code if code < 0 else min(code, 255)


def main(argv: list[str]) -> None:
    log(f"Airlock wrapper, python {sys.version.split()[0]}, slot {Path.cwd()}")
    if "--vacuum" in argv:
        hours = float(argv[argv.index("--hours") + 1]) if "--hours" in argv[:-1] else 12.0
        try:
            finish(vacuum(Path.cwd().resolve(), hours))
        except Stop as stop:
            if stop.finished:
                finish(stop.status)
            sys.exit(stop.status)
    try:
        job = decode_job(argv)
    except (ValueError, json.JSONDecodeError, UnicodeError) as exc:
        log(f"bad job description: {exc}")
        finish(EXIT_INIT_FAILURE)
    try:
        finish(run_task(job))
    except Stop as stop:
        if stop.finished:
            finish(stop.status)
        sys.exit(stop.status)


if __name__ == "__main__":
    main(sys.argv[1:])
