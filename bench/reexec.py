"""Benchmarks run with any Python: re-run under the project's virtualenv when airlock is not importable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ensure_venv() -> None:
    """Call before importing airlock (or anything that does)."""
    try:
        import airlock  # noqa: F401
    except ImportError:
        venv_python = REPO / ".venv" / "bin" / "python"
        # not resolve() on the interpreter: a venv's python is a link to the same binary
        if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
            os.execv(venv_python, [str(venv_python), *sys.argv])
        raise
