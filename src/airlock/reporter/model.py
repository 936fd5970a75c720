"""What a report holds: plain dataclasses, JSON-serialisable through `Report.to_dict()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class StateRow:
    """One line of the reconciliation table (the CMS paper's Table 1): jobs in one state."""

    state: str
    jobs: int
    jobs_with_all_outputs: int  # every declared output is in trusted storage
    files_found: int  # trusted files of these jobs actually present in storage


@dataclass(frozen=True)
class MissingOutput:
    """A declared output of a done job that trusted storage does not hold."""

    job_id: int
    job_name: str
    name: str
    key: str | None  # None when no trusted file was ever recorded for it


@dataclass(frozen=True)
class Orphan:
    """A file in trusted storage that no done job accounts for."""

    key: str
    reason: str
    job_id: int | None = None
    job_state: str | None = None


@dataclass(frozen=True)
class Reconciliation:
    rows: list[StateRow]
    files_recorded: int  # trusted files rows of the jobs in scope
    files_in_storage: int  # keys listed under the trusted prefix
    done_missing: list[MissingOutput]
    orphans: list[Orphan]

    @property
    def drift(self) -> bool:
        return bool(self.done_missing or self.orphans)


@dataclass(frozen=True)
class ReturnTimes:
    """Seconds from a batch's creation to each of its done jobs' finish (the CMS paper's Fig. 2)."""

    batch_id: int
    batch_name: str
    created_at: datetime
    jobs: int
    done: int
    times_s: list[float]  # sorted
    first_s: float | None
    p50_s: float | None  # time until 50 % of the batch's jobs had returned a result; None if never
    p90_s: float | None
    p100_s: float | None


@dataclass(frozen=True)
class HostRow:
    host_id: int
    host_name: str | None
    volunteer: str
    platform: str
    cores: int
    daily_quota: int  # per core, as BOINC's max_jobs_per_day
    tasks: dict[str, int]  # final task state -> count
    in_progress: int
    success_rate: float | None  # valid / (valid + invalid + error + lost); aborts are not the host's fault


@dataclass(frozen=True)
class Reason:
    state: str  # invalid | error
    reason: str
    count: int


@dataclass(frozen=True)
class Outcomes:
    tasks: dict[str, int]  # task state -> count, every state present
    reasons: list[Reason]  # most frequent first


@dataclass(frozen=True)
class Report:
    generated_at: datetime
    batch_id: int | None
    reconciliation: Reconciliation
    return_times: list[ReturnTimes]
    hosts: list[HostRow]
    outcomes: Outcomes
    physics_files: list[str] = field(default_factory=list)  # trusted keys of lbmc events.root files

    def to_dict(self) -> dict[str, Any]:
        out = _jsonable(dataclasses.asdict(self))
        assert isinstance(out, dict)
        out["reconciliation"]["drift"] = self.reconciliation.drift
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
