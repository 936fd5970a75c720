"""What the agent tells the server about its host (the volunteer's computer), and the agent's state file.

The state file, `<work dir>/agent-state.json`, remembers the host id the server gave this agent, keyed by
server URL and user, so a restarted agent reuses its host instead of registering a new one. It holds no
secret (no token, no password) and is in the work directory's root, which the sandbox hides.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from airlock.core.schemas import HostRegistration

STATE_FILE = "agent-state.json"


def platform_triple() -> str:
    """A GNU-style target triple such as x86_64-pc-linux-gnu."""
    machine = platform.machine().lower() or "unknown"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    system = platform.system().lower() or "unknown"
    if system == "linux":
        return f"{machine}-pc-linux-gnu" if machine in {"x86_64", "i686"} else f"{machine}-unknown-linux-gnu"
    if system == "darwin":
        return f"{machine}-apple-darwin"
    return f"{machine}-unknown-{system}"


def memory_mb() -> int:
    """Total memory from /proc/meminfo (MemTotal), in MiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return max(1, int(line.split()[1]) // 1024)
    except OSError:
        pass
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return max(1, pages * page_size // (1 << 20))


def free_memory_mb() -> int:
    """MemAvailable from /proc/meminfo, in MiB (0 if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def disk_free_mb(path: Path) -> int:
    return int(shutil.disk_usage(path).free // (1 << 20))


def cores() -> int:
    return os.cpu_count() or 1


def registration(work_dir: Path, name: str | None = None) -> HostRegistration:
    """The host's description: real cores, total memory and the work directory's free disk."""
    return HostRegistration(
        name=name or platform.node()[:128] or None,
        platform=platform_triple(),
        cores=cores(),
        memory_mb=memory_mb(),
        disk_mb=max(1, disk_free_mb(work_dir)),
    )


def state_key(server: str, user: str) -> str:
    return f"{server.rstrip('/')}|{user}"


def load_host_id(work_dir: Path, server: str, user: str) -> int | None:
    try:
        data = json.loads((work_dir / STATE_FILE).read_text())
        value = data.get("hosts", {}).get(state_key(server, user))
        return int(value) if value is not None else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def save_host_id(work_dir: Path, server: str, user: str, host_id: int) -> None:
    """Record the host id atomically (write a temporary file, rename), readable by the agent's user only."""
    path = work_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), dict):
            data = {"hosts": {}}
    except (OSError, ValueError):
        data = {"hosts": {}}
    data["hosts"][state_key(server, user)] = host_id
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".state-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
