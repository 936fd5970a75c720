"""The token issuer: WLCG Common JWT profile tokens (ES256) for volunteers.

Two kinds: an access token (`compute.*` scopes: pull work, report its own tasks) and a per-task upload
token (`storage.create:/quarantine/<volunteer>/<task>`). Storage that implements the WLCG profile enforces
the upload token by itself; the embedded bridge enforces the same rules.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import Connection, insert

from airlock.core.errors import Forbidden, Unauthorized
from airlock.credentials.keys import SigningKey, load_signing_keys
from airlock.db import schema
from airlock.db.fast import Fast, bound

WLCG_VERSION = "1.0"
COMPUTE_SCOPES = ("compute.read", "compute.modify", "compute.create")
ALGORITHM = "ES256"
LEEWAY_S = 5
VERIFIED_CACHE_SIZE = 100_000
# Tokens this process signed, remembered so that their first use skips the signature check (an upload
# token is used once or twice, so without this every upload would pay a full verification: ~0.3 ms,
# two thirds of it PyJWT's parsing). About 1 kB each; the oldest are forgotten first.
ISSUED_CACHE_SIZE = 20_000
KEYS_RECHECK_S = 30.0


@dataclass(frozen=True)
class Grant:
    """A token decided but not yet signed: what `record_credential` records. A write transaction records
    the grant and the token is signed after the commit (`TokenIssuer.sign`): an ES256 signature with
    PyJWT costs ~50 µs of CPU, which need not hold SQLite's one writer turn."""

    volunteer_id: int
    jti: str
    scope: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Issued:
    token: str
    jti: str
    scope: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Claims:
    volunteer_id: int
    scopes: frozenset[str]
    jti: str
    expires: int
    raw: dict[str, Any]


def quarantine_path(volunteer_id: int, task_id: int) -> str:
    return f"/quarantine/{volunteer_id}/{task_id}"


class TokenIssuer:
    """Signs with the newest key; verifies with any key still in the folder (rotation keeps tokens in
    flight valid). With `keys_dir`, a key added by `airlock keys rotate` is picked up without a restart:
    at most KEYS_RECHECK_S later for signing, at once for verifying a token that names it."""

    def __init__(
        self, issuer: str, keys: list[SigningKey], audience: str | None = None, keys_dir: Path | None = None
    ) -> None:
        if not keys:
            raise ValueError("no token-signing key: run `airlock init` first")
        self.issuer = issuer
        self.audience = audience or issuer
        self.keys_dir = keys_dir
        self._use(keys)
        self._verified: dict[str, Claims] = {}
        self._issued: dict[str, Claims] = {}
        self._checked = time.monotonic()
        self._dir_mtime = self._mtime()

    def _use(self, keys: list[SigningKey]) -> None:
        self._by_kid = {k.kid: k.public for k in keys}
        self.keys = keys

    def _mtime(self) -> int:
        return self.keys_dir.stat().st_mtime_ns if self.keys_dir is not None else 0

    def refresh(self, *, force: bool = False) -> None:
        """Reload the keys if the folder changed (checked at most every KEYS_RECHECK_S unless forced)."""
        if self.keys_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < KEYS_RECHECK_S:
            return
        self._checked = now
        mtime = self._mtime()
        if mtime != self._dir_mtime:
            keys = load_signing_keys(self.keys_dir)
            if keys:
                self._dir_mtime = mtime
                self._use(keys)

    @property
    def current(self) -> SigningKey:
        return self.keys[0]

    def jwks(self) -> dict[str, Any]:
        self.refresh()
        return {"keys": [k.jwk() for k in self.keys]}

    def grant(self, volunteer_id: int, scopes: list[str], now: datetime, ttl: timedelta) -> Grant:
        """Decide a token (its id, scope and lifetime) without signing it."""
        return Grant(volunteer_id, uuid.uuid4().hex, " ".join(scopes), now, now + ttl)

    def sign(self, grant: Grant) -> Issued:
        """The signed token of a grant (with the newest key)."""
        self.refresh()
        iat = int(grant.not_before.timestamp())
        exp = int(grant.not_after.timestamp())
        claims = {
            "wlcg.ver": WLCG_VERSION,
            "iss": self.issuer,
            "sub": str(grant.volunteer_id),
            "aud": self.audience,
            "scope": grant.scope,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": grant.jti,
        }
        token = jwt.encode(
            claims, self.current.private, algorithm=ALGORITHM, headers={"kid": self.current.kid}
        )
        if iat <= time.time() + LEEWAY_S:  # (one valid only later goes through the full check)
            if len(self._issued) >= ISSUED_CACHE_SIZE:
                del self._issued[next(iter(self._issued))]
            self._issued[token] = Claims(
                grant.volunteer_id, frozenset(grant.scope.split()), grant.jti, exp, claims
            )
        return Issued(token, grant.jti, grant.scope, grant.not_before, grant.not_after)

    def issue(self, volunteer_id: int, scopes: list[str], now: datetime, ttl: timedelta) -> Issued:
        """A signed token at once (`grant` then `sign`)."""
        return self.sign(self.grant(volunteer_id, scopes, now, ttl))

    def verify(self, token: str) -> Claims:
        """Check signature, issuer, audience and lifetime; refuse anything but ES256 with a known kid.

        A token that verified once is remembered until it expires (its signature cannot change), so an
        agent's access token costs one ECDSA verification, not one per request; so is one this issuer
        signed itself (an upload token). Lifetime is checked on every call; whether the volunteer is
        still active is checked by each operation."""
        cached = self._verified.get(token) or self._issued.get(token)
        if cached is not None:
            now = time.time()
            if cached.expires + LEEWAY_S < now:
                self._verified.pop(token, None)
                self._issued.pop(token, None)
                raise Unauthorized("token has expired")
            return cached
        claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def verify_compute(self, token: str) -> Claims:
        """A volunteer's access token: verified, and carrying the compute scopes."""
        claims = self.verify(token)
        require_compute(claims)
        return claims

    def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}") from exc
        if header.get("alg") != ALGORITHM:
            raise Unauthorized(f"token algorithm {header.get('alg')!r} is not accepted")
        kid = str(header.get("kid"))
        if kid not in self._by_kid:
            self.refresh(force=True)
        key = self._by_kid.get(kid)
        if key is None:
            raise Unauthorized("token signed by an unknown key")
        try:
            raw = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]},
                leeway=LEEWAY_S,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token has expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        if raw.get("wlcg.ver") != WLCG_VERSION:
            raise Unauthorized("not a WLCG-profile token")
        try:
            volunteer_id = int(raw["sub"])
        except (TypeError, ValueError) as exc:
            raise Unauthorized("token subject is not a volunteer") from exc
        return Claims(volunteer_id, frozenset(str(raw.get("scope", "")).split()), raw["jti"], raw["exp"], raw)


def require_compute(claims: Claims) -> None:
    if not claims.scopes.issuperset(COMPUTE_SCOPES):
        raise Forbidden("this token does not carry the compute scopes")


def allows_create(claims: Claims, path: str) -> bool:
    """WLCG `storage.create:<prefix>` grants creating `path` if it lies under the prefix."""
    for scope in claims.scopes:
        if not scope.startswith("storage.create:"):
            continue
        prefix = scope.removeprefix("storage.create:").rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return True
    return False


_C = schema.credentials
_INSERT_CREDENTIAL = Fast(
    insert(_C).values(bound(_C, "jti", "kind", "volunteer_id", "task_id", "scope", "not_before", "not_after"))
)


def record_credential(
    conn: Connection, issued: Issued | Grant, kind: str, volunteer_id: int, task_id: int | None = None
) -> None:
    _INSERT_CREDENTIAL.run(
        conn,
        {
            "jti": issued.jti,
            "kind": kind,
            "volunteer_id": volunteer_id,
            "task_id": task_id,
            "scope": issued.scope,
            "not_before": issued.not_before,
            "not_after": issued.not_after,
        },
    )
