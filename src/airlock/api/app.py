"""The ASGI application: routers, error mapping, and the background loops' lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from airlock import __version__
from airlock.api import boinc, bridge, credentials, operator, volunteer
from airlock.context import Gateway
from airlock.core.errors import AirlockError
from airlock.service import BackgroundLoops
from airlock.storage.base import AlreadyExists, StorageError

log = logging.getLogger("airlock.api")
THREADS = 8


def _error(status: int, code: str, message: str, detail: Any = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": code, "message": message, "detail": detail}, status_code=status, headers=headers
    )


def _describe(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON"
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def create_app(gw: Gateway, *, background: bool | None = None) -> FastAPI:
    run_loops = gw.settings.background if background is None else background

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Few threads: the work they do is short and mostly holds the GIL; many only thrash it.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        loops = BackgroundLoops(gw) if run_loops else None
        if loops:
            loops.start()
        try:
            yield
        finally:
            if loops:
                loops.stop()

    app = FastAPI(
        title="Airlock gateway",
        version=__version__,
        description="Runs an experiment's batch jobs on untrusted volunteer computers. See docs/api.md.",
        lifespan=lifespan,
    )
    app.state.gateway = gw

    @app.exception_handler(AirlockError)
    async def _airlock_error(request: Request, exc: AirlockError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _describe(exc)
        return _error(
            status,
            "bad_input" if status == 400 else "invalid_request",
            message,
            [{"loc": e.get("loc"), "msg": e.get("msg")} for e in exc.errors()[:20]],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(AlreadyExists)
    async def _exists(request: Request, exc: AlreadyExists) -> JSONResponse:
        return _error(409, "conflict", str(exc))

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return _error(503, "storage_unavailable", f"storage error: {exc}")

    @app.get("/healthz", tags=["public"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/.well-known/jwks.json", tags=["public"])
    async def jwks() -> dict[str, Any]:
        return gw.issuer.jwks()

    # Routes are matched in order: the busiest (BOINC scheduler RPCs, volunteers' calls) first.
    # The scheduler RPC is a plain Starlette route: no dependency injection to resolve per request.
    app.add_route("/boinc/cgi", boinc.scheduler, methods=["POST"])
    app.include_router(boinc.router)
    app.include_router(volunteer.router)
    app.include_router(operator.router)
    app.include_router(bridge.router)
    app.include_router(credentials.router)
    return app
