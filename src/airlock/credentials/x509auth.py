"""X.509 client authentication: a volunteer's proxy (or end-entity certificate) chain, already verified
by the TLS layer against our CA, as the volunteer's identity.

Identity = the first certificate of the chain, walking from the leaf, that is not a proxy: it must be an
EEC our issuing CA signed for `<base>/OU=Volunteers/CN=<id>`, recorded and not revoked. The proxy is
accepted only because the TLS layer checked the RFC 3820 rules (VERIFY_ALLOW_PROXY_CERTS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography import x509
from sqlalchemy import Engine, select

from airlock.core.errors import Forbidden, Unauthorized
from airlock.credentials.ca import CA
from airlock.credentials.tokens import COMPUTE_SCOPES, Claims
from airlock.credentials.vccs import PROXY_CERT_INFO, volunteer_name
from airlock.db import schema
from airlock.db.engine import read

TLS_EXTENSION = "tls"


def peer_chain(scope: Mapping[str, Any]) -> list[str]:
    """The client's verified chain (PEM, leaf first) that our TLS server put into the ASGI scope."""
    tls = scope.get("extensions", {}).get(TLS_EXTENSION) or {}
    return list(tls.get("client_cert_chain") or [])


def identity(chain: list[x509.Certificate]) -> x509.Certificate:
    for cert in chain:
        try:
            cert.extensions.get_extension_for_oid(PROXY_CERT_INFO)
        except x509.ExtensionNotFound:
            return cert
    raise Unauthorized("the client certificate chain holds only proxies")


def claims_from_chain(engine: Engine, ca: CA, chain_pem: list[str]) -> Claims:
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in chain_pem]
    eec = identity(chain)
    if eec.issuer != ca.cert.subject:
        raise Unauthorized("the client certificate was not issued by this gateway's CA")
    cn = eec.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    try:
        volunteer_id = int(str(cn[-1].value))
    except (IndexError, ValueError) as exc:
        raise Unauthorized("the client certificate does not name a volunteer") from exc
    if eec.subject != volunteer_name(ca, volunteer_id):
        raise Unauthorized("the client certificate does not name a volunteer")
    serial = f"{eec.serial_number:x}"
    c = schema.credentials
    serials = {f"{cert.serial_number:x}" for cert in chain}  # the EEC and the proxies we issued under it
    with read(engine) as conn:
        rows = dict(
            conn.execute(
                select(c.c.jti, c.c.revoked).where(
                    c.c.jti.in_(serials), c.c.kind == "x509", c.c.volunteer_id == volunteer_id
                )
            ).all()
        )
    if serial not in rows:
        raise Unauthorized("the client certificate is not one this gateway issued")
    if any(rows.values()):
        raise Forbidden("the client certificate has been revoked")
    return Claims(
        volunteer_id,
        frozenset(COMPUTE_SCOPES),
        f"x509:{serial}",
        int(min(cert.not_valid_after_utc for cert in chain).timestamp()),
        {"x509": chain_pem[0]},
    )
