"""Apply a state transition as part of the caller's transaction, with its audit Event.

The legal transitions live in `airlock.core.states`; this module is the only place that writes a state
column, so a transition that is not listed there cannot happen. Statements are built once per shape and
reused: these run on every dispatch, upload and report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    Update,
    bindparam,
    insert,
    literal_column,
    update,
)

from airlock.core.errors import IllegalTransition
from airlock.core.states import (
    FILE_TRANSITIONS,
    JOB_TRANSITIONS,
    TASK_TRANSITIONS,
    UPSTREAM_JOB_TRANSITIONS,
    VOLUNTEER_TRANSITIONS,
    FileState,
    JobState,
    TaskState,
    UpstreamJobState,
    VolunteerState,
)
from airlock.db import schema
from airlock.db.engine import utcnow
from airlock.db.fast import Fast

_MACHINES: dict[str, tuple[Table, dict[Any, frozenset[Any]]]] = {
    "job": (schema.jobs, JOB_TRANSITIONS),
    "task": (schema.tasks, TASK_TRANSITIONS),
    "volunteer": (schema.volunteers, VOLUNTEER_TRANSITIONS),
    "file": (schema.files, FILE_TRANSITIONS),
    "upstream_job": (schema.upstream_jobs, UPSTREAM_JOB_TRANSITIONS),
}
_ENTITY = {
    JobState: "job",
    TaskState: "task",
    VolunteerState: "volunteer",
    FileState: "file",
    UpstreamJobState: "upstream_job",
}
_INSERT_EVENT = Fast(
    insert(schema.events).values(
        at=bindparam("at"),
        actor=bindparam("actor"),
        action=bindparam("action"),
        object_type=bindparam("object_type"),
        object_id=bindparam("object_id"),
        detail=bindparam("detail", type_=schema.events.c.detail.type),
    )
)


def record_event(
    conn: Connection, actor: str, action: str, object_type: str, object_id: int, detail: Any = None
) -> None:
    _INSERT_EVENT.run(
        conn,
        {
            "at": utcnow(),
            "actor": actor,
            "action": action,
            "object_type": object_type,
            "object_id": object_id,
            "detail": detail,
        },
    )


_STATE_VALUE = re.compile(r"^[a-z_]+$")


def in_states(column: ColumnElement[Any], states: Iterable[str]) -> ColumnElement[bool]:
    """`column IN ('a', 'b')` with the states written into the SQL: a fixed set of our own state names
    (checked to be plain identifiers), so the statement compiles once and is cached, where a list of
    bound values would be re-expanded on every execution."""
    values = sorted(states)
    if not values or not all(_STATE_VALUE.match(v) for v in values):
        raise ValueError(f"not a set of state names: {values!r}")
    return column.in_([literal_column(f"'{v}'") for v in values])


@lru_cache(maxsize=512)
def _statement(entity: str, target: str, legal: tuple[str, ...], columns: tuple[str, ...]) -> Fast:
    table = _MACHINES[entity][0]
    stmt: Update = (
        update(table)
        .where(table.c.id == bindparam("_id"), in_states(table.c.state, legal))
        .values(state=target, **{c: bindparam(f"_v_{c}", type_=table.c[c].type) for c in columns})
    )
    return Fast(stmt)


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
    values = values or {}
    entity, stmt = _transition_statement(type(target), target, only_from, tuple(values))
    params = {"_id": object_id}
    for k, v in values.items():
        params[f"_v_{k}"] = v
    if stmt.run(conn, params) != 1:
        return False
    record_event(conn, actor, action or f"{entity}.{target.value}", entity, object_id, detail)
    return True


# The caches below take the state's class as an argument of its own: members of two machines' enums
# that share a name (JobState.DONE, UpstreamJobState.DONE) are equal strings, and would share an entry.
@lru_cache(maxsize=512)
def _legal(
    kind: type[StrEnum], target: StrEnum, only_from: frozenset[StrEnum] | None
) -> tuple[str, tuple[str, ...]]:
    """The entity of `target` (a state of `kind`) and the states it may be entered from (narrowed to
    `only_from`)."""
    entity = _ENTITY[type(target)]
    legal = _MACHINES[entity][1].get(target, frozenset())
    if only_from is not None:
        legal = legal & only_from
    if not legal:
        raise IllegalTransition(f"{entity} can never enter state {target.value!r} this way")
    return entity, tuple(sorted(s.value for s in legal))


@lru_cache(maxsize=512)
def _transition_statement(
    kind: type[StrEnum], target: StrEnum, only_from: frozenset[StrEnum] | None, columns: tuple[str, ...]
) -> tuple[str, Fast]:
    """The entity and the statement of a transition to `target` (from its legal sources, narrowed to
    `only_from`) that also writes `columns`: worked out once per shape, a transition runs on every
    dispatch, upload and report."""
    entity, legal = _legal(kind, target, only_from)
    return entity, _statement(entity, target.value, legal, tuple(sorted(columns)))


MANY_AT_ONCE = 500  # objects a statement of `transition_many` names at most


def transition_many(
    conn: Connection,
    target: StrEnum,
    details: Mapping[int, Any],
    actor: str,
    *,
    values: dict[str, Any] | None = None,
    action: str | None = None,
    only_from: frozenset[StrEnum] | None = None,
) -> list[int]:
    """`transition` for many objects of one kind at once, in the caller's transaction: `details` maps
    each object's id to its audit event's detail. One UPDATE moves all that may move (with the same
    `values`), and their events go in with one executemany: the loops that settle a hundred jobs or
    files a transaction hold SQLite's writer turn for two statements, not two a job. Returns the ids
    that moved, in the order given."""
    if not details:
        return []
    entity, legal = _legal(type(target), target, only_from)
    table = _MACHINES[entity][0]
    ids = list(details)
    moved: set[int] = set()
    for i in range(0, len(ids), MANY_AT_ONCE):
        stmt = (
            update(table)
            .where(table.c.id.in_(ids[i : i + MANY_AT_ONCE]), in_states(table.c.state, legal))
            .values(state=target.value, **(values or {}))
            .returning(table.c.id)
        )
        moved.update(conn.execute(stmt).scalars())
    done = [i for i in ids if i in moved]
    if done:
        now, name = utcnow(), action or f"{entity}.{target.value}"
        conn.execute(
            insert(schema.events),
            [
                {"at": now, "actor": actor, "action": name, "object_type": entity, "object_id": i,
                 "detail": details[i]}
                for i in done
            ],
        )  # fmt: skip
    return done


def require_transition(conn: Connection, target: StrEnum, object_id: int, actor: str, **kw: Any) -> None:
    if not transition(conn, target, object_id, actor, **kw):
        entity = _ENTITY[type(target)]
        raise IllegalTransition(
            f"{entity} {object_id} cannot move to {target.value!r} from its current state"
        )
