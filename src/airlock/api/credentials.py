"""Credential endpoints: X.509 proxies for volunteers (VCCS), the CA certificate and CRL, what the CA
issued (operator), and OIDC discovery for the token issuer."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, Field

from airlock.api.deps import GatewayDep, Operator, Volunteer
from airlock.core.errors import BadInput, Unauthorized
from airlock.core.schemas import Strict, TokenResponse
from airlock.credentials import accounts, crl
from airlock.credentials.ca import CA, load_ca
from airlock.credentials.tokens import COMPUTE_SCOPES, record_credential
from airlock.credentials.vccs import VCCS
from airlock.db.engine import read, utcnow
from airlock.db.transitions import record_event

router = APIRouter(tags=["credentials"])
PEM = "application/x-pem-file"
_services: dict[tuple[Path, str], VCCS] = {}


class ProxyRequest(Strict):
    csr: str = Field(min_length=1, max_length=32_768, description="PEM CSR for a key the caller generated")
    lifetime_s: int | None = Field(default=None, ge=300, description="at most the gateway's proxy lifetime")
    authenticator: str | None = Field(
        default=None, max_length=64, description="BOINC account key, instead of an Authorization header"
    )


class ProxyReply(BaseModel):
    proxy: str = Field(description="the proxy certificate (PEM); its key is the one in the CSR")
    eec: str = Field(description="the volunteer's end-entity certificate (PEM), the proxy's issuer")
    ca_chain: str = Field(description="issuing CA and root (PEM)")
    subject: str
    identity: str
    serial: str
    not_after: datetime


def vccs(gw: GatewayDep) -> VCCS:
    s = gw.settings
    key = (s.keys_dir.resolve(), s.ca_dn_base)
    service = _services.get(key)
    if service is None:
        service = VCCS(
            load_ca(s.keys_dir, s.ca_dn_base),
            s.keys_dir,
            timedelta(seconds=s.eec_lifetime_s),
            timedelta(seconds=s.proxy_lifetime_s),
        )
        _services[key] = service
    return service


def _ca(gw: GatewayDep) -> CA:
    return vccs(gw).ca


def _login(gw: GatewayDep, authorization: str | None, authenticator: str | None) -> int:
    """The caller's volunteer id from a bearer token, a user name and password, or a BOINC authenticator."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return gw.issuer.verify_compute(value.strip()).volunteer_id
    if scheme.lower() == "basic" and value:
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise BadInput("malformed Basic authorization header") from exc
        if not sep:
            raise BadInput("Basic authorization must be base64(user:password)")
        return accounts.check_password(gw.engine, user, password)
    if authenticator:
        with read(gw.engine) as conn:
            return accounts.check_authenticator(conn, authenticator)
    raise Unauthorized("log in with a bearer token, Basic user:password, or a BOINC authenticator")


@router.post("/api/v1/credentials/x509")
def issue_proxy(
    gw: GatewayDep, body: ProxyRequest, authorization: Annotated[str | None, Header()] = None
) -> ProxyReply:
    """An RFC 3820 proxy for the key in the CSR, signed by the caller's end-entity certificate
    (<base>/OU=Volunteers/CN=<volunteer id>, held by the gateway). The caller's private key never travels."""
    volunteer_id = _login(gw, authorization, body.authenticator)
    service = vccs(gw)
    lifetime = timedelta(seconds=body.lifetime_s) if body.lifetime_s else None
    with gw.engine.begin() as conn:
        accounts.require_active(conn, volunteer_id)
        issued = service.issue_proxy(conn, volunteer_id, body.csr, utcnow(), lifetime)
        record_event(
            conn,
            f"volunteer:{volunteer_id}",
            "credential.x509",
            "volunteer",
            volunteer_id,
            {"serial": issued.serial},
        )
    return ProxyReply(
        proxy=issued.proxy_pem,
        eec=issued.eec_pem,
        ca_chain=issued.ca_chain_pem,
        subject=issued.subject,
        identity=issued.identity,
        serial=issued.serial,
        not_after=issued.not_after,
    )


@router.post("/api/v1/auth/refresh", tags=["volunteer"])
async def refresh(gw: GatewayDep, who: Volunteer) -> TokenResponse:
    """A fresh access token for a valid one: an agent renews without sending its password again (an
    active volunteer only; the new token is recorded like a login's). Runs on the event loop: one short
    transaction, cheaper than a hand-off to the thread pool (see airlock.api.volunteer)."""
    ttl = timedelta(seconds=gw.settings.access_token_ttl_s)
    # Signed before the write transaction (it holds SQLite's single writer lock for less time); it is
    # returned only if the volunteer is still active when it is recorded.
    issued = gw.issuer.issue(who.volunteer_id, list(COMPUTE_SCOPES), utcnow(), ttl)
    with gw.engine.begin() as conn:
        accounts.require_active(conn, who.volunteer_id)
        record_credential(conn, issued, "access", who.volunteer_id)
    return TokenResponse(access_token=issued.token, expires_in=int(ttl.total_seconds()), scope=issued.scope)


@router.get("/api/v1/ca/certificate", tags=["public"], response_class=Response)
def ca_certificate(gw: GatewayDep) -> Response:
    """The issuing CA and the root (PEM)."""
    return Response(_ca(gw).chain_pem(), media_type=PEM)


@router.get("/api/v1/ca/crl", tags=["public"], response_class=Response)
def ca_crl(gw: GatewayDep, der: bool = Query(default=False)) -> Response:
    """The issuing CA's current CRL: the end-entity certificates of blocked volunteers and revoked ones."""
    ca = _ca(gw)
    with read(gw.engine) as conn:
        revocations = crl.build_crl(conn, ca, utcnow())
    if der:
        return Response(
            revocations.public_bytes(serialization.Encoding.DER), media_type="application/pkix-crl"
        )
    return Response(revocations.public_bytes(serialization.Encoding.PEM), media_type=PEM)


@router.get("/api/v1/ca/issued", tags=["operator"])
def issued(gw: GatewayDep, _: Operator, volunteer: int | None = None) -> list[dict[str, Any]]:
    with read(gw.engine) as conn:
        return crl.list_x509(conn, volunteer)


@router.get("/api/v1/ca/issued/{serial}", tags=["operator"])
def issued_one(gw: GatewayDep, _: Operator, serial: str) -> dict[str, Any]:
    with read(gw.engine) as conn:
        return crl.show_x509(conn, serial)


@router.post("/api/v1/ca/issued/{serial}/revoke", tags=["operator"])
def revoke(gw: GatewayDep, who: Operator, serial: str) -> dict[str, Any]:
    with gw.engine.begin() as conn:
        return crl.revoke_x509(conn, serial, who)


@router.get("/.well-known/openid-configuration", tags=["public"])
def openid_configuration(gw: GatewayDep) -> dict[str, Any]:
    """OIDC discovery for the token issuer (what WLCG-profile storage reads to find our keys)."""
    base = gw.settings.public_url
    return {
        "issuer": gw.issuer.issuer,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "token_endpoint": f"{base}/api/v1/auth/token",
        "response_types_supported": ["token"],
        "grant_types_supported": ["password"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": [*COMPUTE_SCOPES, "storage.create"],
        "claims_supported": ["wlcg.ver", "iss", "sub", "aud", "scope", "iat", "nbf", "exp", "jti"],
    }
