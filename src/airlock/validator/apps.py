"""Per-app validation: a check on a result's outputs and a comparator for replicated results.

An app registers an `AppValidator` under the name jobs give in their `app` field (in code with
`register`, or from another package through the `airlock.apps` entry-point group). Jobs without an app,
or with one nobody registered, get `DefaultValidator`: no content check, agreement = equal digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol


class InvalidResult(Exception):
    """The outputs are not an acceptable result of the job; the message says why."""


@dataclass(frozen=True)
class Output:
    name: str
    path: Path
    size: int
    sha256: str


class AppValidator(Protocol):
    name: str

    def check(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> None:
        """Raise InvalidResult if the outputs are not a plausible result for these parameters."""
        ...

    def fingerprint(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> str:
        """A string that two results share exactly when they agree (quorum)."""
        ...


class DefaultValidator:
    name = "default"

    def check(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> None:
        return None

    def fingerprint(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> str:
        h = hashlib.sha256()
        for name in sorted(outputs):
            h.update(f"{name}\0{outputs[name].sha256}\n".encode())
        return h.hexdigest()


_REGISTRY: dict[str, AppValidator] = {}
_LOADED = False


def register(validator: AppValidator) -> AppValidator:
    _REGISTRY[validator.name] = validator
    return validator


def _load_entry_points() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for ep in entry_points(group="airlock.apps"):
        obj = ep.load()
        register(obj() if isinstance(obj, type) else obj)


def validator_for(app: str | None) -> AppValidator:
    _load_entry_points()
    if app is None:
        return DefaultValidator()
    # built-in apps register themselves on import
    from airlock.validator import builtin_apps  # noqa: F401

    return _REGISTRY.get(app) or DefaultValidator()
