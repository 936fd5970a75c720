"""A small client of the operator API, used by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from airlock.core.errors import BadInput
from airlock.core.schemas import non_finite_number


class OperatorError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class OperatorClient:
    def __init__(self, server: str, token: str, *, timeout: float = 60.0) -> None:
        self.http = httpx.Client(
            base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise OperatorError(r.status_code, message)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content

    def upload_input(self, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/api/v1/inputs", content=data)
        return result

    def submit(self, description: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
        """Submit a job description; inputs given by `path` are uploaded to the cache first."""
        doc = resolve_input_paths(self, description, base_dir or Path.cwd())
        result: dict[str, Any] = self.call("POST", "/api/v1/batches", json=doc)
        return result

    def add_volunteer(self, name: str, password: str, email: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", "/api/v1/volunteers", json={"name": name, "password": password, "email": email}
        )
        return result


def load_description(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: a job description is a mapping with 'name' and 'jobs'")
    where = non_finite_number(doc, "description")
    if where is not None:  # YAML has .inf and .nan; JSON, which carries it to the gateway, has neither
        raise BadInput(f"{path}: {where} is not a number JSON can hold (infinite or NaN)")
    return doc


def resolve_input_paths(client: OperatorClient, doc: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    uploaded: dict[Path, str] = {}

    def fix(inp: Any) -> Any:
        if not isinstance(inp, dict) or "path" not in inp:
            return inp
        path = (base_dir / str(inp["path"])).resolve()
        if path not in uploaded:
            if not path.is_file():
                raise BadInput(f"input file {path} does not exist")
            uploaded[path] = client.upload_input(path.read_bytes())["sha256"]
        out = {k: v for k, v in inp.items() if k != "path"}
        out["sha256"] = uploaded[path]
        out.setdefault("name", path.name)
        return out

    doc = dict(doc)
    if isinstance(doc.get("defaults"), dict) and isinstance(doc["defaults"].get("inputs"), list):
        doc["defaults"] = {**doc["defaults"], "inputs": [fix(i) for i in doc["defaults"]["inputs"]]}
    if isinstance(doc.get("jobs"), list):
        doc["jobs"] = [
            {**job, "inputs": [fix(i) for i in job["inputs"]]}
            if isinstance(job, dict) and isinstance(job.get("inputs"), list)
            else job
            for job in doc["jobs"]
        ]
    return doc
