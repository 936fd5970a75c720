"""Airlock's own submission API as an upstream: the trivial implementation.

Jobs arrive by ``POST /api/v1/batches``, so there is nothing to fetch; the job's ``ref`` is the Airlock
job id, status reports are only recorded as events, and outputs stay in trusted storage (where the
operator API serves them), so nothing is uploaded or registered anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import Engine

from airlock.db.transitions import record_event
from airlock.upstream.base import OutputFile, UpstreamJob, UpstreamStatus

ACTOR = "upstream:airlock"


class LocalUpstream:
    name = "airlock"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _event(self, job: UpstreamJob, action: str, detail: Mapping[str, object]) -> None:
        if not job.ref.isdigit():
            return
        with self.engine.begin() as conn:
            record_event(conn, ACTOR, action, "job", int(job.ref), dict(detail))

    def fetch_job(self) -> UpstreamJob | None:
        return None  # jobs come in through the submission API

    def download_inputs(self, job: UpstreamJob, dest: Path) -> list[Path]:
        return []  # inputs are uploaded to the cache before submission

    def report_status(self, job: UpstreamJob, status: UpstreamStatus) -> None:
        self._event(
            job,
            "upstream.status",
            {"status": status.status, "minor": status.minor, "application": status.application},
        )

    def set_parameters(self, job: UpstreamJob, params: Mapping[str, str | int | float]) -> None:
        self._event(job, "upstream.parameters", params)

    def heartbeat(self, job: UpstreamJob, metrics: Mapping[str, str | int | float]) -> Mapping[str, str]:
        return {}  # the operator cancels through the API instead

    def upload_output_sandbox(self, job: UpstreamJob, files: Sequence[Path]) -> str | None:
        return None  # outputs stay in trusted storage

    def output_registered(self, job: UpstreamJob, output: OutputFile) -> bool:
        return True

    def register_output(self, job: UpstreamJob, output: OutputFile, path: Path) -> None:
        return None

    def reschedule(self, job: UpstreamJob) -> None:
        return None

    def close(self) -> None:
        return None
