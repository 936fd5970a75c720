"""A real gateway process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .helpers import OPERATOR_TOKEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveGateway:
    def __init__(
        self, data_dir: Path, database_url: str | None = None, port: int | None = None, **settings: str
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        self.env.update({"AIRLOCK_OPERATOR_TOKEN": OPERATOR_TOKEN, "AIRLOCK_LOOP_INTERVAL_S": "0.2"})
        self.env.update({f"AIRLOCK_{k.upper()}": v for k, v in settings.items()})
        if database_url:
            self.env["AIRLOCK_DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "gateway.log"

    def start(self) -> LiveGateway:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airlock",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--public-url",
                self.url,
                "--log-level",
                "warning",
            ],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("gateway did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def op(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=30
        )
