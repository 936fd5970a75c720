"""One rendering of every error the gateway answers with: `{"error", "message", "detail"}` and a status.

Used by the FastAPI exception handlers (`api.app`) and by the hot-route front (`api.hot`), so a client
gets the same answer whichever layer served its request."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from airlock.core.errors import AirlockError
from airlock.storage.base import AlreadyExists, StorageError

log = logging.getLogger("airlock.api")

Headers = dict[str, str] | None
Rendered = tuple[int, dict[str, Any], Headers]


def error(status: int, code: str, message: str, detail: Any = None) -> Rendered:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return status, {"error": code, "message": message, "detail": detail}, headers


def for_exception(exc: Exception) -> Rendered | None:
    """The answer to an error the logic raised, or None for one that is a bug (a 500)."""
    if isinstance(exc, AirlockError):
        return error(exc.status, exc.code, exc.message)
    if isinstance(exc, AlreadyExists):
        return error(409, "conflict", str(exc))
    if isinstance(exc, StorageError):
        log.error("storage error: %s", exc)
        return error(503, "storage_unavailable", f"storage error: {exc}")
    return None


def for_validation(errors: Sequence[Any], *, in_body: bool = False) -> Rendered:
    """A request that did not validate: 400 when the body is not JSON at all, else 422 naming each
    field. `in_body`: pydantic's locations are relative to the body (FastAPI's start with "body")."""
    errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in errors] if in_body else list(errors)
    if any(e.get("type") == "json_invalid" for e in errors):
        status, code, message = 400, "bad_input", "the request body is not valid JSON"
    else:
        parts = []
        for e in errors[:10]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        status, code, message = 422, "invalid_request", "invalid request: " + "; ".join(parts)
    return error(status, code, message, [{"loc": e.get("loc"), "msg": e.get("msg")} for e in errors[:20]])


def missing_body() -> Rendered:
    return for_validation([{"type": "missing", "loc": ("body",), "msg": "Field required"}])


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON, as Starlette's JSONResponse writes it."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
