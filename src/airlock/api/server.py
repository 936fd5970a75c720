"""Run the gateway on uvicorn (uvloop + httptools when installed)."""

from __future__ import annotations

import json
import logging
import os

import uvicorn

from airlock.api.app import create_app
from airlock.api.hot import HotRoutes
from airlock.api.tls import https_options
from airlock.config import Settings, load_settings
from airlock.context import Gateway
from airlock.db.budget import check_connection_budget
from airlock.db.migrate import upgrade
from airlock.service import BackgroundLoops, LoopsProcess

WORKER_ENV = "AIRLOCK_SERVER_WORKER"


def serving_app(gw: Gateway, *, background: bool | None = None) -> HotRoutes:
    """The application uvicorn serves: the FastAPI app behind the hot-route front."""
    return HotRoutes(create_app(gw, background=background), gw)


def create_from_env() -> HotRoutes:
    """App factory for uvicorn's worker processes (settings come from the environment)."""
    settings = load_settings()
    return serving_app(Gateway.open(settings), background=False)


def serve(settings: Settings, *, log_level: str = "info") -> None:
    gw = Gateway.open(settings)
    upgrade(gw.engine)
    # PostgreSQL: refuse to start if the processes' pools together could exceed the server's limit
    check_connection_budget(gw.engine, workers=settings.workers, per_process=settings.database_connections)
    common = {
        "host": settings.bind_host,
        "port": settings.bind_port,
        "log_level": log_level,
        "access_log": log_level == "debug",
        "timeout_keep_alive": 30,
        "backlog": 4096,
        **https_options(settings),
    }
    if settings.workers == 1:
        # The loops in a process of their own (see LoopsProcess), the requests in this one.
        loops_process = LoopsProcess(settings) if settings.background else None
        if loops_process:
            loops_process.start()
        try:
            uvicorn.run(serving_app(gw, background=False), **common)  # type: ignore[arg-type]
        finally:
            if loops_process:
                loops_process.stop()
            logging.getLogger("airlock").info("gateway stopped")
        return
    # Several HTTP processes; the background loops run once, in this supervising process.
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        # lists and tables as JSON, which `load_settings` reads back; everything else as text
        os.environ[f"AIRLOCK_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, list | dict) else str(value)
        )
    loops = BackgroundLoops(gw) if settings.background else None
    if loops:
        loops.start()
    try:
        uvicorn.run("airlock.api.server:create_from_env", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    finally:
        if loops:
            loops.stop()
        logging.getLogger("airlock").info("gateway stopped")
