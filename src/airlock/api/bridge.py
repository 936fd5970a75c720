"""The embedded data bridge's HTTP face: PUT creates, every other method is refused."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from airlock.api.deps import Credentials, GatewayDep, PathId
from airlock.bridge.quarantine import receive_upload
from airlock.core.errors import AirlockError
from airlock.core.schemas import UploadAccepted
from airlock.credentials.tokens import Claims

router = APIRouter(tags=["data bridge"])

REFUSED = ["GET", "HEAD", "DELETE", "POST", "PATCH", "OPTIONS", "MOVE", "COPY", "PROPFIND", "MKCOL"]


@router.put(
    "/quarantine/{volunteer_id}/{task_id}/{name}",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": UploadAccepted, "description": "the identical bytes were already stored"}},
)
async def upload(
    gw: GatewayDep, creds: Credentials, request: Request, volunteer_id: PathId, task_id: PathId, name: str
) -> Response:
    """Upload one declared output of a task (create-only). Needs the task's upload token and a
    `Digest: adler32=<hex>,sha-256=<base64>` header; the body streams to disk."""
    claims: Claims | None = None
    if creds is not None and creds.scheme.lower() == "bearer":
        claims = gw.issuer.verify(creds.credentials)
    receipt, created = await receive_upload(
        gw.engine,
        gw.quarantine,
        claims,
        volunteer_id,
        task_id,
        name,
        {k.lower(): v for k, v in request.headers.items()},
        request.stream(),
    )
    return JSONResponse(receipt.model_dump(), status_code=201 if created else 200)


class MethodRefused(AirlockError):
    status = 405
    code = "method_not_allowed"


@router.api_route("/quarantine/{path:path}", methods=REFUSED, include_in_schema=False)
async def refuse(path: str) -> Response:
    raise MethodRefused(
        "the quarantine is upload-only: volunteers may create new files with PUT and nothing else"
    )
