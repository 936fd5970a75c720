"""Memory and CPU of a process tree read from /proc (Linux), so psutil is not a dependency."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1] is the ppid
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if (_PROC / str(pid)).exists():
            tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in kB; zeros if it is gone."""
    rss = hwm = 0
    try:
        with open(_PROC / str(pid) / "status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, hwm


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included), in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def backends_of(database: str) -> list[int]:
    """The PostgreSQL server processes serving `database` on this machine (their title names it:
    `postgres: 15/main: <user> <database> <client> <state>`)."""
    found = []
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            title = (_PROC / entry.name / "cmdline").read_bytes().replace(b"\0", b" ").split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if title[:1] == [b"postgres:"] and database.encode() in title[2:]:
            found.append(int(entry.name))
    return found


@dataclass
class TreeSample:
    rss_kb: int
    processes: int


@dataclass
class TreeMonitor:
    """Samples a process tree (or the processes `select` returns) in a background thread: peak of the
    summed RSS, per-process peak (VmHWM) and CPU time, remembering processes that have already exited."""

    root: int
    interval: float = 0.2
    select: Callable[[], list[int]] | None = None  # the processes to watch instead of root's tree
    peak_rss_kb: int = 0
    peak_processes: int = 0
    hwm_kb: dict[int, int] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> TreeSample:
        pids = self.select() if self.select is not None else process_tree(self.root)
        total = 0
        with self._lock:
            for pid in pids:
                rss, hwm = memory_kb(pid)
                total += rss
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
                cpu = cpu_seconds(pid)
                if cpu:
                    self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), cpu)
            self.peak_rss_kb = max(self.peak_rss_kb, total)
            self.peak_processes = max(self.peak_processes, len(pids))
        return TreeSample(total, len(pids))

    def total_cpu_s(self) -> float:
        """CPU seconds used so far by every process ever seen in the tree (takes a fresh sample)."""
        self.sample()
        with self._lock:
            return sum(self.cpu_s.values())

    def sum_hwm_kb(self) -> int:
        with self._lock:
            return sum(self.hwm_kb.values())

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
