"""A real, headless Debian `boinc` client in a private folder, driven with `boinccmd`: what `airlock demo
--boinc N` and the end-to-end tests run. Facts in shared/notes/boinc-protocol.md."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from airlock.api.process import free_port

# process_priority 2 is "normal" in BOINC's common_defs.h (0, the client's default, is the lowest).
CC_CONFIG = """<cc_config>
  <log_flags>
    <sched_op_debug>1</sched_op_debug>
    <file_xfer_debug>1</file_xfer_debug>
    <task_debug>1</task_debug>
  </log_flags>
  <options>
    <ncpus>{ncpus}</ncpus>
    <process_priority>2</process_priority>
  </options>
</cc_config>
"""
# The client's computing preferences. By default it stops computing while other processes use more than
# 25 % of the CPU (it donates idle CPU only); here 0: never (see BoincHost).
GLOBAL_PREFS = """<global_preferences>
  <run_if_user_active>1</run_if_user_active>
  <suspend_cpu_usage>0</suspend_cpu_usage>
  <niu_suspend_cpu_usage>0</niu_suspend_cpu_usage>
  <cpu_usage_limit>100</cpu_usage_limit>
  <max_ncpus_pct>100</max_ncpus_pct>
</global_preferences>
"""


def boinc_available() -> str | None:
    """Why the real client cannot run here, or None."""
    for tool in ("boinc", "boinccmd"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package boinc-client; `make test` installs it)"
    return None


@dataclass
class BoincHost:
    """A headless stock client in a private folder. A volunteer's client only donates idle CPU: it
    runs its apps at the lowest priority and suspends them while other processes keep the CPU busy.
    These run on a machine of their own (the demo, the tests), where any other busy process (the
    suite's other workers) would stop them and their tasks would miss their deadlines: they compute
    whatever the load, their apps at normal priority."""

    folder: Path
    ncpus: int = 1
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(8))
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "gui_rpc_auth.cfg").write_text(self.password)
        (self.folder / "cc_config.xml").write_text(CC_CONFIG.format(ncpus=self.ncpus))
        (self.folder / "global_prefs_override.xml").write_text(GLOBAL_PREFS)
        with (self.folder / "client.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["boinc", "--dir", str(self.folder), "--gui_rpc_port", str(self.port),
                 "--skip_cpu_benchmarks", "--no_info_fetch", "--no_gpus", "--allow_remote_gui_rpc"],
                cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.cmd("--get_cc_status", check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"the BOINC client did not start; see {self.folder / 'client.log'}")

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["boinccmd", "--host", f"127.0.0.1:{self.port}", "--passwd", self.password, *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise RuntimeError(f"boinccmd {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def lookup_account(self, url: str, email: str, password: str) -> str:
        """The account key, fetched from the project as a volunteer would (lookup_account.php)."""
        out = self.cmd("--lookup_account", url, email, password).stdout
        if "account key:" not in out:
            raise RuntimeError(f"boinccmd --lookup_account: {out.strip()[:300]}")
        return out.split("account key:")[-1].strip().split()[0]

    def attach(self, url: str, authenticator: str) -> None:
        self.cmd("--project_attach", url, authenticator)

    def update(self, url: str) -> None:
        self.cmd("--project", url, "update", check=False)

    def tasks(self) -> list[dict[str, str]]:
        """`boinccmd --get_tasks`, one dict per task (name, state, active_task_state, ...)."""
        out: list[dict[str, str]] = []
        for line in self.cmd("--get_tasks", check=False).stdout.splitlines():
            line = line.strip()
            if line.startswith(tuple(f"{n}) -----------" for n in range(1, 1000))):
                out.append({})
            elif ":" in line and out:
                key, _, value = line.partition(":")
                out[-1][key.strip()] = value.strip()
        return out

    def messages(self) -> str:
        return self.cmd("--get_messages", check=False).stdout

    def state_file(self) -> ET.Element | None:
        path = self.folder / "client_state.xml"
        try:
            return ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            return None

    def kill(self) -> None:
        """Kill the client and everything it started, as a crash or a pulled plug would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.cmd("--quit", check=False)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            with contextlib.suppress(ProcessLookupError):  # apps it started in its process group
                os.killpg(self.proc.pid, signal.SIGKILL)
