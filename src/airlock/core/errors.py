"""Errors the logic raises; the HTTP layer maps each to one status code and a clear message."""

from __future__ import annotations


class AirlockError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(AirlockError):
    status = 400
    code = "bad_input"


class Unauthorized(AirlockError):
    status = 401
    code = "unauthorized"


class Forbidden(AirlockError):
    status = 403
    code = "forbidden"


class NotFound(AirlockError):
    status = 404
    code = "not_found"


class Conflict(AirlockError):
    status = 409
    code = "conflict"


class Gone(AirlockError):
    status = 410
    code = "gone"


class TooLarge(AirlockError):
    status = 413
    code = "too_large"


class IllegalTransition(Conflict):
    code = "illegal_transition"
