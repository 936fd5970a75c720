"""The published OpenAPI describes the API the docs describe."""

from __future__ import annotations

from .helpers import Api


def test_openapi_lists_every_documented_route(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/api/v1/auth/token", "post"),
        ("/api/v1/hosts", "post"),
        ("/api/v1/work", "post"),
        ("/api/v1/tasks/{task_id}/heartbeat", "post"),
        ("/api/v1/tasks/{task_id}/report", "post"),
        ("/api/v1/inputs/{sha256}", "get"),
        ("/api/v1/inputs", "post"),
        ("/api/v1/batches", "post"),
        ("/api/v1/batches", "get"),
        ("/api/v1/batches/{batch_id}/cancel", "post"),
        ("/api/v1/jobs", "get"),
        ("/api/v1/jobs/{job_id}", "get"),
        ("/api/v1/jobs/{job_id}/cancel", "post"),
        ("/api/v1/jobs/{job_id}/outputs/{name}", "get"),
        ("/api/v1/volunteers", "post"),
        ("/api/v1/volunteers/{volunteer_id}/block", "post"),
        ("/api/v1/hosts", "get"),
        ("/quarantine/{volunteer_id}/{task_id}/{name}", "put"),
        ("/healthz", "get"),
    }
    missing = {(p, m) for p, m in expected if m not in paths.get(p, {})}
    assert missing == set()
    # the quarantine offers nothing but PUT
    assert set(paths["/quarantine/{volunteer_id}/{task_id}/{name}"]) == {"put"}
    # request models are published with their constraints
    report = spec["components"]["schemas"]["TaskReport"]
    assert report["additionalProperties"] is False and "exit_code" in report["required"]
