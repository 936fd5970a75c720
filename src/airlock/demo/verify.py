"""An independent check for the demo: regenerate each job's events from its seed and compare them with
what reached trusted storage. A tampered output that got past validation would show up here."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from airlock.context import Gateway
from airlock.db import schema
from airlock.db.engine import read
from airlock.db.schema import file_kind
from airlock.demo import lbmc
from airlock.demo.lbmc_validator import LbmcValidator
from airlock.validator.apps import Output


def untampered(gw: Gateway, batch_id: int) -> tuple[int, list[str]]:
    """(outputs checked, descriptions of the ones that differ from an honest run)."""
    f, j = schema.files, schema.jobs
    with read(gw.engine) as conn:
        rows = conn.execute(
            select(f.c.location, f.c.size, f.c.sha256, j.c.name, j.c.spec)
            .join(j, j.c.id == f.c.job_id)
            .where(file_kind("trusted"), j.c.batch_id == batch_id, f.c.name == "events.root")
        ).all()
    validator = LbmcValidator()
    bad: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for row in rows:
            params: dict[str, Any] = row.spec["params"]
            path = gw.trusted.local_path(row.location)
            if path is None:  # remote trusted storage: check a copy
                path = scratch / "trusted.root"
                with gw.trusted.open_read(row.location) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            got = validator.fingerprint(
                params, {"events.root": Output("events.root", path, row.size, row.sha256)}
            )
            honest = _honest_fingerprint(params, scratch / "honest.root")
            if got != honest:
                bad.append(row.name)
    return len(rows), bad


def _honest_fingerprint(params: dict[str, Any], scratch: Path) -> str:
    """Regenerate the job's events from its seed in a scratch file outside any storage area."""
    seed = int(params["seed"])
    lbmc.write(str(scratch), seed, lbmc.generate(seed, int(params["events"])))
    out = Output("events.root", scratch, scratch.stat().st_size, "")
    return LbmcValidator().fingerprint(params, {"events.root": out})
