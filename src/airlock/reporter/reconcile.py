"""Job states against the files actually found in trusted storage (the CMS paper's Table 1).

The database says what should be there; trusted storage is asked what is. Two kinds of drift are flagged:
a done job whose declared outputs are not all present, and a stored file that no done job accounts for.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from airlock.core.states import JobState
from airlock.db.schema import file_kind, files, jobs
from airlock.reporter.model import MissingOutput, Orphan, Reconciliation, StateRow
from airlock.storage.base import Storage

TRUSTED_PREFIX = "trusted/"
STATE_ORDER = [s.value for s in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)] + [
    s.value for s in JobState if s not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
]


@dataclass(frozen=True)
class _TrustedFile:
    job_id: int
    name: str
    key: str


def declared_outputs(spec: Any) -> list[str]:
    """Output names of a stored JobSpec; tolerant of specs that do not parse."""
    if not isinstance(spec, dict) or not isinstance(spec.get("outputs"), list):
        return []
    return [o["name"] for o in spec["outputs"] if isinstance(o, dict) and isinstance(o.get("name"), str)]


def _trusted_files(conn: Connection) -> list[tuple[_TrustedFile, str, int]]:
    """Every trusted file row with its job's state and batch."""
    q = (
        select(files.c.job_id, files.c.name, files.c.location, jobs.c.state, jobs.c.batch_id)
        .join(jobs, jobs.c.id == files.c.job_id)
        .where(file_kind("trusted"))
        .order_by(files.c.id)
    )
    return [(_TrustedFile(r.job_id, r.name, r.location), r.state, r.batch_id) for r in conn.execute(q)]


def reconcile(
    conn: Connection, trusted: Storage, *, batch_id: int | None = None, prefix: str = TRUSTED_PREFIX
) -> Reconciliation:
    q = select(jobs.c.id, jobs.c.name, jobs.c.state, jobs.c.spec).order_by(jobs.c.id)
    if batch_id is not None:
        q = q.where(jobs.c.batch_id == batch_id)
    job_rows = list(conn.execute(q))
    all_files = _trusted_files(conn)
    in_scope = {r.id for r in job_rows}
    by_job: dict[int, list[_TrustedFile]] = defaultdict(list)
    for f, _state, _batch in all_files:
        if f.job_id in in_scope:
            by_job[f.job_id].append(f)

    present: dict[str, bool] = {}
    jobs_count: Counter[str] = Counter()
    complete: Counter[str] = Counter()
    found: Counter[str] = Counter()
    done_missing: list[MissingOutput] = []
    for job in job_rows:
        recorded = {f.name: f for f in by_job[job.id]}
        for f in recorded.values():
            present[f.key] = trusted.exists(f.key)
        names = list(dict.fromkeys([*declared_outputs(job.spec), *recorded]))
        missing = [n for n in names if n not in recorded or not present[recorded[n].key]]
        jobs_count[job.state] += 1
        found[job.state] += sum(present[f.key] for f in recorded.values())
        if names and not missing:
            complete[job.state] += 1
        if job.state == JobState.DONE:
            done_missing += [
                MissingOutput(job.id, job.name, n, recorded[n].key if n in recorded else None)
                for n in missing
            ]

    stored = sorted(trusted.list(prefix))
    return Reconciliation(
        rows=[
            StateRow(state, jobs_count[state], complete[state], found[state]) for state in _states(jobs_count)
        ],
        files_recorded=sum(len(v) for v in by_job.values()),
        files_in_storage=len(stored),
        done_missing=done_missing,
        orphans=_orphans(stored, all_files, in_scope, scoped=batch_id is not None),
    )


def _states(counts: Counter[str]) -> list[str]:
    """Job states in a fixed order (finals first), plus any unknown state found in the database."""
    return STATE_ORDER + sorted(s for s in counts if s not in STATE_ORDER)


def _orphans(
    stored: Iterable[str], all_files: list[tuple[_TrustedFile, str, int]], in_scope: set[int], *, scoped: bool
) -> list[Orphan]:
    owner = {f.key: (f, state) for f, state, _batch in all_files}
    orphans: list[Orphan] = []
    for key in stored:
        if key not in owner:
            orphans.append(Orphan(key, "no trusted file is recorded under this key"))
            continue
        f, state = owner[key]
        if scoped and f.job_id not in in_scope:
            continue  # another batch's file: that batch's report judges it
        if state != JobState.DONE:
            orphans.append(Orphan(key, f"its job is {state}, not done", f.job_id, state))
    return orphans
