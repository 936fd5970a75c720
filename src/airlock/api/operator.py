"""Operator endpoints: inputs, batches, jobs, outputs, volunteers and hosts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from airlock.api.deps import GatewayDep, Operator, PathId
from airlock.core.checksums import CHUNK
from airlock.core.errors import Conflict, NotFound
from airlock.core.schemas import (
    INT32,
    BatchCreated,
    BatchView,
    HostView,
    InputStored,
    JobView,
    VolunteerRegistration,
    VolunteerView,
)
from airlock.credentials import accounts
from airlock.db.engine import read
from airlock.generator.inputs import receive_input, register_input
from airlock.generator.submit import parse_batch, refresh_statistics, submit_batch
from airlock.reporter import views
from airlock.scheduler import replication
from airlock.scheduler.replication import cancel_job

router = APIRouter(prefix="/api/v1", tags=["operator"])


@router.post("/inputs", status_code=status.HTTP_201_CREATED)
async def upload_input(gw: GatewayDep, who: Operator, request: Request) -> InputStored:
    """Store a file in the content-addressed input cache (raw body); the same bytes are stored once."""
    digest = await receive_input(gw.inputs, request.stream())

    def _register() -> InputStored:
        with gw.engine.begin() as conn:
            return register_input(conn, digest)

    return await run_in_threadpool(_register)


@router.post("/batches", status_code=status.HTTP_201_CREATED)
def submit(gw: GatewayDep, who: Operator, body: dict[str, Any]) -> BatchCreated:
    """Submit a batch (the job description as JSON; `airlock submit` reads YAML). See `BatchSpec`."""
    spec = parse_batch(body)
    with gw.engine.begin() as conn:
        created = submit_batch(conn, spec, actor=who)
    refresh_statistics(gw.engine, len(created.jobs))
    return created


@router.get("/batches")
def batches(gw: GatewayDep, who: Operator) -> list[BatchView]:
    with read(gw.engine) as conn:
        return views.list_batches(conn)


@router.get("/batches/{batch_id}")
def batch(gw: GatewayDep, who: Operator, batch_id: PathId) -> BatchView:
    with read(gw.engine) as conn:
        return views.get_batch(conn, batch_id)


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(gw: GatewayDep, who: Operator, batch_id: PathId) -> dict[str, int]:
    with gw.engine.begin() as conn:
        views.get_batch(conn, batch_id)
        return {"cancelled": replication.cancel_batch(conn, batch_id, who)}


@router.get("/jobs")
def jobs(
    gw: GatewayDep,
    who: Operator,
    batch_id: int | None = Query(default=None, ge=1, le=INT32),
    state: str | None = None,
    limit: int = Query(default=1000, ge=1, le=100_000),
    offset: int = Query(default=0, ge=0),
) -> list[JobView]:
    with read(gw.engine) as conn:
        return views.list_jobs(conn, batch_id, state, limit, offset)


@router.get("/jobs/{job_id}")
def job(gw: GatewayDep, who: Operator, job_id: PathId) -> JobView:
    with read(gw.engine) as conn:
        return views.get_job(conn, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel(gw: GatewayDep, who: Operator, job_id: PathId) -> JobView:
    with gw.engine.begin() as conn:
        current = views.get_job(conn, job_id)
        if not cancel_job(conn, job_id, who):
            raise Conflict(f"job {job_id} is {current.state} and cannot be cancelled")
        return views.get_job(conn, job_id)


@router.get("/jobs/{job_id}/outputs/{name}", response_class=FileResponse)
def output(gw: GatewayDep, who: Operator, job_id: PathId, name: str) -> Response:
    """A validated output, from trusted storage."""
    with read(gw.engine) as conn:
        row = views.trusted_output(conn, job_id, name)
    path = gw.trusted.local_path(row.location)
    if path is None and gw.trusted.exists(row.location):  # remote trusted storage: relay a checked copy
        return StreamingResponse(
            _relay(gw.trusted.open_read(row.location)),
            media_type="application/octet-stream",
            headers={
                "Digest": f"adler32={row.adler32}",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )
    if path is None or not path.is_file():
        raise NotFound(f"output {name} of job {job_id} is recorded but missing from trusted storage")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=name,
        headers={"Digest": f"adler32={row.adler32}"},
    )


def _relay(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk


@router.post("/volunteers", status_code=status.HTTP_201_CREATED)
def create_volunteer(gw: GatewayDep, who: Operator, body: VolunteerRegistration) -> VolunteerView:
    with gw.engine.begin() as conn:
        return accounts.register_volunteer(conn, body.name, body.password, body.email, actor=who)


@router.get("/volunteers")
def volunteers(gw: GatewayDep, who: Operator) -> list[VolunteerView]:
    with read(gw.engine) as conn:
        return accounts.list_volunteers(conn)


@router.post("/volunteers/{volunteer_id}/block")
def block(gw: GatewayDep, who: Operator, volunteer_id: PathId) -> dict[str, str]:
    with gw.engine.begin() as conn:
        accounts.block(conn, volunteer_id, who)
    return {"state": "blocked"}


@router.post("/volunteers/{volunteer_id}/unblock")
def unblock(gw: GatewayDep, who: Operator, volunteer_id: PathId) -> dict[str, str]:
    with gw.engine.begin() as conn:
        accounts.unblock(conn, volunteer_id, who)
    return {"state": "active"}


@router.get("/hosts")
def hosts(gw: GatewayDep, who: Operator) -> list[HostView]:
    with read(gw.engine) as conn:
        return views.list_hosts(conn)


@router.get("/report")
def report(
    gw: GatewayDep, who: Operator, batch_id: int | None = Query(default=None, ge=1, le=INT32)
) -> JSONResponse:
    from airlock.reporter.report import build_report

    with read(gw.engine) as conn:
        return JSONResponse(build_report(conn, gw.trusted, batch_id=batch_id).to_dict())
