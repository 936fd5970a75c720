"""Volunteer accounts: registration, login, block and unblock."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from airlock.core.errors import Conflict, Forbidden, NotFound, Unauthorized
from airlock.core.schemas import VolunteerView
from airlock.core.states import JOB_FINAL, TaskState, VolunteerState
from airlock.credentials.tokens import COMPUTE_SCOPES, Issued, TokenIssuer, record_credential
from airlock.db import schema
from airlock.db.engine import read, utcnow
from airlock.db.fast import Fast
from airlock.db.transitions import record_event, require_transition, transition

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def register_volunteer(
    conn: Connection, name: str, password: str, email: str | None, actor: str
) -> VolunteerView:
    now = utcnow()
    try:
        with conn.begin_nested():
            vid = conn.execute(
                insert(schema.volunteers)
                .values(
                    name=name,
                    email=email,
                    password_hash=_hasher.hash(password),
                    boinc_passwd_hash=_hasher.hash(boinc_passwd_hash(password, email)) if email else None,
                    authenticator=secrets.token_hex(16),
                    state=VolunteerState.ACTIVE.value,
                    created_at=now,
                )
                .returning(schema.volunteers.c.id)
            ).scalar_one()
    except IntegrityError as exc:
        raise Conflict(f"volunteer name {name!r} is taken") from exc
    record_event(conn, actor, "volunteer.registered", "volunteer", vid, {"name": name})
    return VolunteerView(id=vid, name=name, state=VolunteerState.ACTIVE.value, created_at=now)


def boinc_passwd_hash(password: str, email: str) -> str:
    """What a BOINC client sends for a password: md5(password + lower(email)) in hex (BOINC's scheme; the
    gateway stores only an argon2 hash of it)."""
    return hashlib.md5((password + email.lower()).encode(), usedforsecurity=False).hexdigest()


def lookup_boinc_account(engine: Engine, email: str, passwd_hash: str) -> str:
    """The authenticator of the volunteer with this e-mail address, if `passwd_hash` is BOINC's hash of
    their password (deliberately slow, like a login, and as slow for an unknown address)."""
    with read(engine) as conn:
        row = conn.execute(
            select(schema.volunteers.c.authenticator, schema.volunteers.c.boinc_passwd_hash).where(
                func.lower(schema.volunteers.c.email) == email.lower()
            )
        ).first()
    try:
        _hasher.verify(row.boinc_passwd_hash if row and row.boinc_passwd_hash else _DUMMY_HASH, passwd_hash)
        ok = row is not None and row.boinc_passwd_hash is not None
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None:
        raise Unauthorized("no account with this e-mail address and password")
    return str(row.authenticator)


_VOLUNTEER_STATE = Fast(select(schema.volunteers.c.state).where(schema.volunteers.c.id == bindparam("id")))


def require_active(conn: Connection, volunteer_id: int) -> None:
    """Every volunteer request checks this inside its own transaction: a block takes effect at once,
    whatever tokens the volunteer still holds."""
    check_active(_VOLUNTEER_STATE.scalar(conn, {"id": volunteer_id}))


def check_active(state: str | None) -> None:
    """`require_active` on a volunteer's state read by the caller (None: no such volunteer), for a
    request that reads it together with what it checks next."""
    if state is None:
        raise Unauthorized("unknown volunteer")
    if state != VolunteerState.ACTIVE.value:
        raise Forbidden("this volunteer account is blocked")


def check_password(engine: Engine, username: str, password: str) -> int:
    """The volunteer id if the password is right (deliberately slow: argon2, outside any transaction)."""
    with read(engine) as conn:
        row = conn.execute(
            select(schema.volunteers.c.id, schema.volunteers.c.password_hash).where(
                schema.volunteers.c.name == username
            )
        ).one_or_none()
    try:
        _hasher.verify(row.password_hash if row else _DUMMY_HASH, password)
        ok = row is not None
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None:
        raise Unauthorized("wrong user name or password")
    return int(row.id)


def check_authenticator(conn: Connection, authenticator: str) -> int:
    """The volunteer id of a BOINC account key."""
    vid = conn.execute(
        select(schema.volunteers.c.id).where(schema.volunteers.c.authenticator == authenticator)
    ).scalar_one_or_none()
    if vid is None:
        raise Unauthorized("unknown authenticator")
    return int(vid)


def login(engine: Engine, issuer: TokenIssuer, username: str, password: str, ttl: timedelta) -> Issued:
    """Check the password, then issue the token and record it in a short transaction."""
    vid = check_password(engine, username, password)
    with engine.begin() as conn:
        require_active(conn, vid)
        issued = issuer.issue(vid, list(COMPUTE_SCOPES), utcnow(), ttl)
        record_credential(conn, issued, "access", vid)
        record_event(conn, f"volunteer:{vid}", "volunteer.login", "volunteer", vid, {"jti": issued.jti})
    return issued


def block(conn: Connection, volunteer_id: int, actor: str, reason: str | None = None) -> None:
    """Block a volunteer: tokens are refused from now on (checked per request), issued credentials are
    marked revoked, and its leased tasks go back to the queue as lost (they are reissued)."""
    _exists(conn, volunteer_id)
    require_transition(
        conn,
        VolunteerState.BLOCKED,
        volunteer_id,
        actor,
        values={"blocked_at": utcnow()},
        detail={"reason": reason},
    )
    conn.execute(
        update(schema.credentials)
        .where(schema.credentials.c.volunteer_id == volunteer_id)
        .values(revoked=True)
    )
    from airlock.scheduler.replication import revoke_result, settle_job  # the scheduler owns reissue

    leased = conn.execute(
        select(schema.tasks.c.id, schema.tasks.c.job_id).where(
            schema.tasks.c.volunteer_id == volunteer_id, schema.tasks.c.state == TaskState.LEASED.value
        )
    ).all()
    for task_id, job_id in leased:
        if transition(conn, TaskState.LOST, task_id, actor, detail={"reason": "volunteer blocked"}):
            settle_job(conn, job_id, actor)
    # Results it returned that have not reached trusted storage are withdrawn too.
    pending = (
        conn.execute(
            select(schema.tasks.c.id)
            .join(schema.jobs, schema.jobs.c.id == schema.tasks.c.job_id)
            .where(
                schema.tasks.c.volunteer_id == volunteer_id,
                schema.tasks.c.state.in_([TaskState.REPORTED.value, TaskState.VALID.value]),
                schema.jobs.c.state.not_in([s.value for s in JOB_FINAL]),
            )
        )
        .scalars()
        .all()
    )
    for task_id in pending:
        revoke_result(conn, task_id, actor, "volunteer blocked")


def unblock(conn: Connection, volunteer_id: int, actor: str) -> None:
    _exists(conn, volunteer_id)
    require_transition(conn, VolunteerState.ACTIVE, volunteer_id, actor, values={"blocked_at": None})


def _exists(conn: Connection, volunteer_id: int) -> None:
    if (
        conn.execute(select(schema.volunteers.c.id).where(schema.volunteers.c.id == volunteer_id)).first()
        is None
    ):
        raise NotFound(f"no volunteer {volunteer_id}")


def list_volunteers(conn: Connection) -> list[VolunteerView]:
    v, h = schema.volunteers, schema.hosts
    n_hosts = select(func.count()).where(h.c.volunteer_id == v.c.id).scalar_subquery()
    rows = conn.execute(
        select(v.c.id, v.c.name, v.c.state, v.c.created_at, n_hosts.label("hosts")).order_by(v.c.id)
    )
    return [
        VolunteerView(id=r.id, name=r.name, state=r.state, created_at=r.created_at, hosts=r.hosts)
        for r in rows
    ]
