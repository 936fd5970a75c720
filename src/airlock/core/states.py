"""Every state machine of Airlock, in one place.

Each entity lists its states and, for each target state, the states it may be entered from.
`airlock.db.transitions` applies a transition as one database transaction and refuses any other.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    VALIDATING = "validating"
    ASSIMILATING = "assimilating"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskState(StrEnum):
    READY = "ready"
    LEASED = "leased"
    REPORTED = "reported"
    VALID = "valid"
    INVALID = "invalid"
    ERROR = "error"
    LOST = "lost"
    ABORTED = "aborted"


class VolunteerState(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"


class FileState(StrEnum):
    CACHED = "cached"  # an input in the content-addressed cache
    QUARANTINED = "quarantined"  # an output uploaded by a volunteer, not yet validated
    TRUSTED = "trusted"  # a validated output copied to trusted storage
    DELETED = "deleted"  # a quarantine leftover removed by the janitor


class UpstreamJobState(StrEnum):
    """A job pulled from an upstream WMS (DIRAC): how far the gateway got in taking it in and giving
    its outcome back (`upstream_jobs`)."""

    MATCHED = "matched"  # fetched and recorded; not yet an Airlock job
    ACCEPTED = "accepted"  # inputs cached, Airlock job created; outcome not yet given back
    REFUSED = "refused"  # Airlock cannot run it: reported Failed upstream with the reason
    KILLED = "killed"  # killed upstream: the Airlock job was cancelled
    DONE = "done"  # outputs uploaded and registered, then Done reported
    FAILED = "failed"  # reported Failed upstream
    RESCHEDULED = "rescheduled"  # handed back for the upstream to match again


J, T, V, F, U = JobState, TaskState, VolunteerState, FileState, UpstreamJobState

# target state -> states it may be entered from
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.RUNNING: frozenset({J.QUEUED, J.VALIDATING, J.ASSIMILATING}),  # from ASSIMILATING: result revoked
    J.VALIDATING: frozenset({J.RUNNING}),
    J.ASSIMILATING: frozenset({J.VALIDATING, J.RUNNING}),
    J.DONE: frozenset({J.ASSIMILATING}),
    J.FAILED: frozenset({J.QUEUED, J.RUNNING, J.VALIDATING}),
    J.CANCELLED: frozenset({J.QUEUED, J.RUNNING, J.VALIDATING}),
}

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    T.LEASED: frozenset({T.READY}),
    T.REPORTED: frozenset({T.LEASED}),
    T.VALID: frozenset({T.REPORTED}),
    T.INVALID: frozenset({T.REPORTED, T.VALID}),
    T.ERROR: frozenset({T.REPORTED}),
    T.LOST: frozenset({T.LEASED}),
    T.ABORTED: frozenset({T.READY, T.LEASED, T.REPORTED}),
}

VOLUNTEER_TRANSITIONS: dict[VolunteerState, frozenset[VolunteerState]] = {
    V.BLOCKED: frozenset({V.ACTIVE}),
    V.ACTIVE: frozenset({V.BLOCKED}),
}

FILE_TRANSITIONS: dict[FileState, frozenset[FileState]] = {
    F.DELETED: frozenset({F.QUARANTINED}),
}

UPSTREAM_JOB_TRANSITIONS: dict[UpstreamJobState, frozenset[UpstreamJobState]] = {
    U.ACCEPTED: frozenset({U.MATCHED}),
    U.REFUSED: frozenset({U.MATCHED}),
    U.KILLED: frozenset({U.ACCEPTED}),
    U.DONE: frozenset({U.ACCEPTED}),
    U.FAILED: frozenset({U.ACCEPTED}),
    U.RESCHEDULED: frozenset({U.ACCEPTED}),
}

JOB_FINAL = frozenset({J.DONE, J.FAILED, J.CANCELLED})
TASK_FINAL = frozenset({T.VALID, T.INVALID, T.ERROR, T.LOST, T.ABORTED})
# tasks that still count towards a job's replication (running or able to agree)
TASK_LIVE = frozenset({T.READY, T.LEASED, T.REPORTED, T.VALID})
# tasks that ended with no result that could ever count (the host vanished, or the payload failed): their
# volunteer may take the job again. Any other task of a job keeps its volunteer off that job: two results
# of one volunteer never make a quorum, and a rejected result gets no second try from its author.
TASK_NO_RESULT = frozenset({T.LOST, T.ERROR})


def sources(machine: dict[StrEnum, frozenset[StrEnum]], target: StrEnum) -> frozenset[StrEnum]:
    """The states from which `target` may be entered; empty if it is never a target."""
    return machine.get(target, frozenset())
