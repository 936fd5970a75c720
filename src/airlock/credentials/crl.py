"""What the CA issued: listing, revocation and the CRL (signed by the issuing CA)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import Connection, select, update

from airlock.core.errors import NotFound
from airlock.credentials.ca import CA
from airlock.credentials.vccs import EEC_SCOPE
from airlock.db import schema
from airlock.db.transitions import record_event

CRL_VALIDITY = timedelta(hours=24)
_c = schema.credentials


def list_x509(conn: Connection, volunteer_id: int | None = None) -> list[dict[str, Any]]:
    q = select(_c).where(_c.c.kind == "x509").order_by(_c.c.id)
    if volunteer_id is not None:
        q = q.where(_c.c.volunteer_id == volunteer_id)
    return [_view(r._mapping) for r in conn.execute(q)]


def show_x509(conn: Connection, serial: str) -> dict[str, Any]:
    row = conn.execute(select(_c).where(_c.c.kind == "x509", _c.c.jti == serial.lower())).one_or_none()
    if row is None:
        raise NotFound(f"no certificate with serial {serial}")
    return _view(row._mapping)


def revoke_x509(conn: Connection, serial: str, actor: str) -> dict[str, Any]:
    view = show_x509(conn, serial)
    conn.execute(update(_c).where(_c.c.id == view["id"]).values(revoked=True))
    record_event(
        conn, actor, "credential.revoked", "volunteer", view["volunteer_id"], {"serial": view["serial"]}
    )
    return {**view, "revoked": True}


def _view(row: Any) -> dict[str, Any]:
    kind, _, subject = str(row["scope"]).partition(" ")
    return {
        "id": row["id"],
        "serial": row["jti"],
        "type": "eec" if kind == EEC_SCOPE else "proxy",
        "subject": subject,
        "volunteer_id": row["volunteer_id"],
        "not_before": row["not_before"].isoformat(),
        "not_after": row["not_after"].isoformat(),
        "revoked": bool(row["revoked"]),
    }


def build_crl(conn: Connection, ca: CA, now: datetime) -> x509.CertificateRevocationList:
    """The issuing CA's CRL: every revoked EEC not yet expired. (Proxies are signed by EECs, not by the
    CA; revoking an EEC invalidates its proxies with it.)"""
    rows = conn.execute(
        select(_c.c.jti, _c.c.not_before).where(
            _c.c.kind == "x509",
            _c.c.revoked.is_(True),
            _c.c.scope.startswith(EEC_SCOPE + " "),
            _c.c.not_after > now,
        )
    ).all()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    for jti, revoked_at in rows:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(jti, 16)).revocation_date(revoked_at).build()
        )
    return builder.sign(ca.key, hashes.SHA256())
