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
from airlock.api import boinc, bridge, credentials, errors, operator, volunteer
from airlock.context import Gateway
from airlock.core.errors import AirlockError
from airlock.service import BackgroundLoops
from airlock.storage.base import AlreadyExists, StorageError

log = logging.getLogger("airlock.api")
THREADS = 8


def _json(rendered: errors.Rendered) -> JSONResponse:
    status, payload, headers = rendered
    return JSONResponse(payload, status_code=status, headers=headers)


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
    @app.exception_handler(AlreadyExists)
    @app.exception_handler(StorageError)
    async def _known(request: Request, exc: Exception) -> JSONResponse:
        rendered = errors.for_exception(exc)
        assert rendered is not None
        return _json(rendered)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(errors.for_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(errors.error(exc.status_code, "http_error", str(exc.detail)))

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
