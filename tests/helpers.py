"""Test helpers: the operator and simulated volunteers speaking the real HTTP API in-process."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from airlock.context import Gateway
from airlock.core.checksums import digest_bytes, format_digest_header
from airlock.db import schema
from airlock.db.engine import read
from airlock.service import BackgroundLoops

OPERATOR_TOKEN = "operator-secret-7f3a9c1e-never-leaves-the-trusted-domain"
OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
PASSWORD = "correct horse battery staple"
_names = itertools.count(1)


def job(name: str, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "command": ["python3", "run.py"],
        "outputs": [{"name": "out.txt", "max_size": 1000}],
    }
    spec.update(kw)
    return spec


@dataclass
class Api:
    client: TestClient
    gw: Gateway
    volunteers: list[Volunteer] = field(default_factory=list)

    def op(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, path, headers={**OP, **kw.pop("headers", {})}, **kw)

    def submit(self, *jobs: dict[str, Any], name: str = "batch") -> dict[str, Any]:
        r = self.op("POST", "/api/v1/batches", json={"name": name, "jobs": list(jobs)})
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result

    def volunteer(self, cores: int = 4, memory_mb: int = 8000, disk_mb: int = 50_000) -> Volunteer:
        name = f"vol{next(_names)}"
        r = self.op("POST", "/api/v1/volunteers", json={"name": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        v = Volunteer(self, r.json()["id"], name)
        v.login()
        v.register_host(cores=cores, memory_mb=memory_mb, disk_mb=disk_mb)
        self.volunteers.append(v)
        return v

    def loops(self) -> int:
        """One pass of the background loops (expiry, validator, assimilator, janitor)."""
        return BackgroundLoops(self.gw).run_once()

    def settle(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            if not self.loops():
                return

    def job(self, job_id: int) -> dict[str, Any]:
        r = self.op("GET", f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def count(self, table: Any, *where: Any) -> int:
        with read(self.gw.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())

    def snapshot(self) -> dict[str, int]:
        """Row counts of every table: 'nothing half-applied' means this does not change."""
        return {t.name: self.count(t) for t in schema.metadata.sorted_tables}


@dataclass
class Volunteer:
    api: Api
    id: int
    name: str
    token: str = ""
    host_id: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def login(self) -> None:
        r = self.api.client.post("/api/v1/auth/token", json={"username": self.name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        self.token = r.json()["access_token"]

    def register_host(self, **kw: Any) -> None:
        r = self.api.client.post(
            "/api/v1/hosts", json={"platform": "x86_64-pc-linux-gnu", **kw}, headers=self.auth
        )
        assert r.status_code == 201, r.text
        self.host_id = r.json()["host_id"]

    def request(self, slots: int = 1, **kw: Any) -> Any:
        return self.api.client.post(
            "/api/v1/work", json={"host_id": self.host_id, "slots": slots, **kw}, headers=self.auth
        )

    def work(self, slots: int = 1, **kw: Any) -> list[dict[str, Any]]:
        r = self.request(slots, **kw)
        assert r.status_code == 200, r.text
        tasks: list[dict[str, Any]] = r.json()["tasks"]
        return tasks

    def upload(
        self,
        task: dict[str, Any],
        data: bytes,
        name: str | None = None,
        *,
        digest_of: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        out = (
            task["outputs"][0]
            if name is None
            else next((o for o in task["outputs"] if o["name"] == name), None)
        )
        url = out["upload_url"] if out else task["outputs"][0]["upload_url"].rsplit("/", 1)[0] + f"/{name}"
        d = digest_bytes(digest_of if digest_of is not None else data)
        hdrs = {
            "Authorization": f"Bearer {token or task['upload_token']}",
            "Digest": format_digest_header(d.adler32, d.sha256),
        }
        hdrs.update(headers or {})
        return self.api.client.put(url.replace("http://testserver", ""), content=data, headers=hdrs)

    def report(
        self,
        task: dict[str, Any],
        exit_code: int = 0,
        outputs: dict[str, bytes] | None = None,
        host_id: int | None = None,
    ) -> Any:
        outs = [
            {"name": n, "size": len(b), "adler32": digest_bytes(b).adler32, "sha256": digest_bytes(b).sha256}
            for n, b in (outputs or {}).items()
        ]
        return self.api.client.post(
            f"/api/v1/tasks/{task['task_id']}/report",
            json={"host_id": host_id or self.host_id, "exit_code": exit_code, "outputs": outs},
            headers=self.auth,
        )

    def complete(self, task: dict[str, Any], data: bytes = b"42\n", exit_code: int = 0) -> None:
        """Upload the first declared output and report success: an honest volunteer."""
        name = task["outputs"][0]["name"]
        r = self.upload(task, data)
        assert r.status_code in (200, 201), r.text
        r = self.report(task, exit_code, {name: data})
        assert r.status_code == 200, r.text

    def heartbeat(self, task: dict[str, Any]) -> Any:
        return self.api.client.post(
            f"/api/v1/tasks/{task['task_id']}/heartbeat", json={"host_id": self.host_id}, headers=self.auth
        )


def assert_error(r: Any, status: int, *fragments: str) -> dict[str, Any]:
    """An error reply: exactly `status`, a JSON body {"error", "message"} whose message says each fragment."""
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    for fragment in fragments:
        assert fragment.lower() in body["message"].lower(), (fragment, body["message"])
    return body
