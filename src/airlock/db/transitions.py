"""Apply a state transition as part of the caller's transaction, with its audit Event.

The legal transitions live in `airlock.core.states`; this module is the only place that writes a state
column, so a transition that is not listed there cannot happen.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Table, insert, update

from airlock.core.errors import IllegalTransition
from airlock.core.states import (
    FILE_TRANSITIONS,
    JOB_TRANSITIONS,
    TASK_TRANSITIONS,
    VOLUNTEER_TRANSITIONS,
    FileState,
    JobState,
    TaskState,
    VolunteerState,
)
from airlock.db import schema
from airlock.db.engine import utcnow

_MACHINES: dict[str, tuple[Table, dict[Any, frozenset[Any]]]] = {
    "job": (schema.jobs, JOB_TRANSITIONS),
    "task": (schema.tasks, TASK_TRANSITIONS),
    "volunteer": (schema.volunteers, VOLUNTEER_TRANSITIONS),
    "file": (schema.files, FILE_TRANSITIONS),
}
_ENTITY = {JobState: "job", TaskState: "task", VolunteerState: "volunteer", FileState: "file"}


def record_event(
    conn: Connection, actor: str, action: str, object_type: str, object_id: int, detail: Any = None
) -> None:
    conn.execute(
        insert(schema.events).values(
            at=utcnow(),
            actor=actor,
            action=action,
            object_type=object_type,
            object_id=object_id,
            detail=detail,
        )
    )


def transition(
    conn: Connection,
    target: StrEnum,
    object_id: int,
    actor: str,
    *,
    values: dict[str, Any] | None = None,
    detail: Any = None,
    action: str | None = None,
    only_from: frozenset[StrEnum] | None = None,
) -> bool:
    """Move one object to `target` if its current state allows it; False if it did not.

    `values` are further columns written in the same UPDATE. `only_from` narrows the legal sources.
    The caller decides whether a False is an error (see `require_transition`).
    """
    entity = _ENTITY[type(target)]
    table, machine = _MACHINES[entity]
    legal = machine.get(target, frozenset())
    if only_from is not None:
        legal = legal & only_from
    if not legal:
        raise IllegalTransition(f"{entity} can never enter state {target.value!r} this way")
    stmt = (
        update(table)
        .where(table.c.id == object_id, table.c.state.in_([s.value for s in legal]))
        .values(state=target.value, **(values or {}))
    )
    if conn.execute(stmt).rowcount != 1:
        return False
    record_event(conn, actor, action or f"{entity}.{target.value}", entity, object_id, detail)
    return True


def require_transition(conn: Connection, target: StrEnum, object_id: int, actor: str, **kw: Any) -> None:
    if not transition(conn, target, object_id, actor, **kw):
        entity = _ENTITY[type(target)]
        raise IllegalTransition(
            f"{entity} {object_id} cannot move to {target.value!r} from its current state"
        )
