"""A large output streams through the bridge: the gateway's memory does not grow with the upload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from airlock.bridge.quarantine import output_key
from airlock.core.checksums import StreamingDigest, format_digest_header

from .helpers import PASSWORD
from .live import LiveGateway

pytestmark = pytest.mark.slow

SIZE = 256 * 2**20
CHUNK = 2**20


def body() -> Iterator[bytes]:
    for i in range(SIZE // CHUNK):
        yield bytes([i % 251]) * CHUNK


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_256_mb_upload_streams_without_growing_the_gateway(tmp_path: Path) -> None:
    digest = StreamingDigest()
    for chunk in body():
        digest.update(chunk)
    d = digest.digest()
    gw = LiveGateway(tmp_path / "gw", background="false").start()
    try:
        with gw.op() as op:
            job = {"name": "big", "command": ["x"], "outputs": [{"name": "big.bin", "max_size": "512MiB"}]}
            assert op.post("/api/v1/batches", json={"name": "b", "jobs": [job]}).status_code == 201
            assert (
                op.post("/api/v1/volunteers", json={"name": "alice", "password": PASSWORD}).status_code == 201
            )
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            token = c.post("/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}).json()
            auth = {"Authorization": f"Bearer {token['access_token']}"}
            host = c.post(
                "/api/v1/hosts",
                json={"platform": "x", "cores": 1, "memory_mb": 1000, "disk_mb": 1000},
                headers=auth,
            ).json()["host_id"]
            (task,) = c.post("/api/v1/work", json={"host_id": host}, headers=auth).json()["tasks"]
            assert gw.proc is not None
            before = peak_rss_kb(gw.proc.pid)
            r = c.put(
                task["outputs"][0]["upload_url"].removeprefix(gw.url),
                content=body(),
                headers={
                    "Authorization": f"Bearer {task['upload_token']}",
                    "Content-Length": str(SIZE),
                    "Digest": format_digest_header(d.adler32, d.sha256),
                },
            )
            after = peak_rss_kb(gw.proc.pid)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == SIZE and r.json()["sha256"] == d.sha256
        stored = tmp_path / "gw" / "storage" / output_key(1, task["task_id"], "big.bin")
        assert stored.stat().st_size == SIZE
        assert (after - before) < 64 * 1024, f"gateway peak RSS grew by {(after - before) // 1024} MB"
    finally:
        gw.stop()
