"""Request dependencies: the gateway, the operator and volunteer identities.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in the thread pool, and a thread
hand-off per dependency costs more than the work itself (a cached token check). The one that needs the
database (X.509 client authentication) hands that part to a thread itself."""

from __future__ import annotations

import hmac
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airlock.context import Gateway
from airlock.core.errors import Unauthorized
from airlock.core.schemas import INT32
from airlock.credentials.tokens import Claims
from airlock.credentials.x509auth import claims_from_chain, peer_chain

bearer = HTTPBearer(auto_error=False, description="operator token or volunteer access token")


async def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing bearer token (Authorization: Bearer ...)")
    return creds.credentials


def _is_operator(gw: Gateway, token: str) -> bool:
    return gw.operator_token is not None and hmac.compare_digest(token.encode(), gw.operator_token.encode())


async def operator(gw: GatewayDep, creds: Credentials) -> str:
    if not _is_operator(gw, _token(creds)):
        raise Unauthorized("this endpoint needs the operator token")
    return "operator"


async def volunteer(gw: GatewayDep, creds: Credentials, request: Request) -> Claims:
    """A volunteer access token with the compute scopes, or (HTTPS, no token) the volunteer's X.509
    proxy or certificate. (Whether the volunteer is still active is checked inside each operation's own
    transaction.)"""
    if creds is None and (chain := peer_chain(request.scope)):
        from airlock.api.credentials import vccs  # the CA, loaded once

        return await anyio.to_thread.run_sync(lambda: claims_from_chain(gw.engine, vccs(gw).ca, chain))
    return gw.issuer.verify_compute(_token(creds))


async def volunteer_or_operator(gw: GatewayDep, creds: Credentials) -> Claims | str:
    token = _token(creds)
    if _is_operator(gw, token):
        return "operator"
    return gw.issuer.verify_compute(token)


Operator = Annotated[str, Depends(operator)]
Volunteer = Annotated[Claims, Depends(volunteer)]
Reader = Annotated[Claims | str, Depends(volunteer_or_operator)]

# Object ids in paths: bounded like the columns they name, so an absurd id is a 422, not a database error.
PathId = Annotated[int, Path(ge=1, le=INT32)]
