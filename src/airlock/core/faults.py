"""Crash points for the exactly-once tests: `AIRLOCK_CRASH_AT=<name>` makes the process die there, as a
power cut would (no cleanup, no exception handlers)."""

from __future__ import annotations

import os

_TARGET = os.environ.get("AIRLOCK_CRASH_AT")


def crash_point(name: str) -> None:
    if _TARGET is not None and name == _TARGET:
        os._exit(86)
