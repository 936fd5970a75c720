"""WLCG-profile tokens: OIDC discovery and JWKS, key rotation with tokens in flight, lifetimes, and clear
refusals of bad tokens (expired, not yet valid, wrong audience, alg none, another issuer, unknown key)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from airlock.credentials.keys import generate_signing_key, load_signing_keys, retire_signing_key
from airlock.credentials.tokens import COMPUTE_SCOPES, TokenIssuer
from airlock.db import schema
from airlock.db.engine import utcnow

from .helpers import Api, assert_error, job
from .test_credentials import claims


def test_discovery_and_jwks_verify_our_tokens(api: Api) -> None:
    conf = api.client.get("/.well-known/openid-configuration").json()
    assert conf["issuer"] == api.gw.issuer.issuer == "http://testserver"
    assert conf["jwks_uri"] == "http://testserver/.well-known/jwks.json"
    assert "ES256" in conf["id_token_signing_alg_values_supported"]
    assert set(COMPUTE_SCOPES) <= set(conf["scopes_supported"])
    jwks = api.client.get(conf["jwks_uri"].removeprefix("http://testserver")).json()
    api.submit(job("a"))
    v = api.volunteer()
    (task,) = v.work()
    for token, scope in ((v.token, " ".join(COMPUTE_SCOPES)), (task["upload_token"], None)):
        kid = jwt.get_unverified_header(token)["kid"]
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
        key = jwt.PyJWK(jwk).key
        claims = jwt.decode(token, key, algorithms=["ES256"], audience=conf["issuer"], issuer=conf["issuer"])
        assert claims["wlcg.ver"] == "1.0" and claims["sub"] == str(v.id)
        if scope:
            assert claims["scope"] == scope
            assert claims["exp"] - claims["iat"] == api.gw.settings.access_token_ttl_s
        else:
            assert claims["scope"] == f"storage.create:/quarantine/{v.id}/{task['task_id']}"
            # valid for this task only, for minutes (`upload_token_ttl_s`), never past its deadline
            deadline = datetime.fromisoformat(task["deadline"]).timestamp()
            ttl = api.gw.settings.upload_token_ttl_s
            assert abs(claims["exp"] - min(deadline, claims["iat"] + ttl)) <= 1


def test_rotation_keeps_tokens_in_flight_valid(api: Api) -> None:
    issuer = api.gw.issuer
    v = api.volunteer()
    old_kid = jwt.get_unverified_header(v.token)["kid"]
    keys_dir = api.gw.settings.keys_dir
    # Another server process that loaded the keys before the rotation.
    other = TokenIssuer(issuer.issuer, load_signing_keys(keys_dir), keys_dir=keys_dir)
    time.sleep(0.01)
    new = generate_signing_key(keys_dir)  # what `airlock keys rotate` does
    issuer.refresh(force=True)
    kids = {k["kid"] for k in api.client.get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {old_kid, new.kid}
    assert v.request().status_code == 200  # the token in flight still works
    v.login()
    assert jwt.get_unverified_header(v.token)["kid"] == new.kid
    assert v.request().status_code == 200
    # The other process verifies a token signed with the new key at once (it reloads on an unknown kid).
    assert other.verify(v.token).volunteer_id == v.id
    # Retiring the old key: tokens it signed stop verifying; the current key cannot be retired.
    with pytest.raises(ValueError, match="current signing key"):
        retire_signing_key(keys_dir, new.kid)
    old_token = TokenIssuer(issuer.issuer, [k for k in issuer.keys if k.kid == old_kid]).issue(
        v.id, list(COMPUTE_SCOPES), utcnow(), timedelta(minutes=5)
    )
    retire_signing_key(keys_dir, old_kid)
    issuer.refresh(force=True)
    assert_error(
        api.client.post(
            "/api/v1/work",
            json={"host_id": v.host_id},
            headers={"Authorization": f"Bearer {old_token.token}"},
        ),
        401,
        "unknown key",
    )


def test_keys_commands(tmp_path: Any) -> None:
    env = {k: val for k, val in os.environ.items() if not k.startswith("AIRLOCK_")}

    def airlock(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "airlock", *args, "--data-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert airlock("init").returncode == 0
    (first,) = load_signing_keys(tmp_path / "keys")
    r = airlock("keys", "rotate")
    assert r.returncode == 0 and "new signing key" in r.stdout
    current, previous = load_signing_keys(tmp_path / "keys")
    assert previous.kid == first.kid and current.kid != first.kid
    r = airlock("keys", "list")
    assert f"{current.kid} signs" in r.stdout and f"{first.kid} verifies" in r.stdout
    r = airlock("keys", "retire", current.kid)
    assert r.returncode == 1 and "rotate first" in r.stdout
    r = airlock("keys", "retire", first.kid)
    assert r.returncode == 0
    assert [k.kid for k in load_signing_keys(tmp_path / "keys")] == [current.kid]
    # key ids are hex, so no id is ever taken for an option (a base64url one began with '-' once in 64)
    assert re.fullmatch(r"[0-9a-f]{16}", current.kid)


def test_a_key_id_beginning_with_a_dash_can_be_retired(tmp_path: Any) -> None:
    """Key ids of older Airlocks were base64url and could begin with '-': `--` still retires them."""
    env = {k: val for k, val in os.environ.items() if not k.startswith("AIRLOCK_")}

    def airlock(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "airlock", *args], env=env, capture_output=True, text=True, timeout=60
        )

    assert airlock("init", "--data-dir", str(tmp_path)).returncode == 0
    keys = tmp_path / "keys"
    (old,) = load_signing_keys(keys)
    (keys / f"token-{old.kid}.pem").rename(keys / "token--pfCotwJ2i6r7_Gm.pem")
    assert airlock("keys", "rotate", "--data-dir", str(tmp_path)).returncode == 0
    new, _ = load_signing_keys(keys)
    assert "-pfCotwJ2i6r7_Gm verifies" in airlock("keys", "list", "--data-dir", str(tmp_path)).stdout
    r = airlock("keys", "--data-dir", str(tmp_path), "retire", "--", "-pfCotwJ2i6r7_Gm")
    assert r.returncode == 0, r.stderr
    assert [k.kid for k in load_signing_keys(keys)] == [new.kid]


def test_bad_tokens_are_refused_clearly(api: Api) -> None:
    v = api.volunteer()
    key = api.gw.issuer.current
    now = int(time.time())

    def signed(**over: Any) -> str:
        return jwt.encode(claims(api, v.id, **over), key.private, algorithm="ES256", headers={"kid": key.kid})

    stranger = ec.generate_private_key(ec.SECP256R1())
    unsigned = jwt.encode(claims(api, v.id), None, algorithm="none")
    cases = {
        "expired": (signed(iat=now - 7200, nbf=now - 7200, exp=now - 3600), "expired"),
        "not yet valid": (signed(nbf=now + 3600), "not yet valid"),
        "wrong audience": (signed(aud="https://elsewhere.example"), "audience"),
        "alg none": (unsigned, "algorithm 'none' is not accepted"),
        "another issuer": (signed(iss="https://evil.example"), "issuer"),
        "no wlcg.ver": (signed(**{"wlcg.ver": None}), "WLCG"),
        "no exp": (signed(exp=None), "exp"),
        "unknown key": (
            jwt.encode(claims(api, v.id), stranger, algorithm="ES256", headers={"kid": "nope"}),
            "unknown key",
        ),
        "our kid, other key": (
            jwt.encode(claims(api, v.id), stranger, algorithm="ES256", headers={"kid": key.kid}),
            "signature",
        ),
        "HS256 with the public key": (_hs256(api, v.id), "algorithm 'HS256'"),
        "garbage": ("not.a.token", "malformed"),
        "upload token for work": (signed(scope=f"storage.create:/quarantine/{v.id}/1"), "compute scopes"),
    }
    before = api.snapshot()
    for name, (token, fragment) in cases.items():
        r = api.client.post(
            "/api/v1/work", json={"host_id": v.host_id}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code in (401, 403), (name, r.text)
        assert_error(r, r.status_code, fragment)
    assert api.snapshot() == before
    assert api.client.post("/api/v1/work", json={"host_id": v.host_id}, headers=v.auth).status_code == 200


def _hs256(api: Api, volunteer_id: int) -> str:
    """The classic confusion: HMAC 'signed' with the public key's bytes."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": api.gw.issuer.current.kid}).encode())
    payload = b64(json.dumps(claims(api, volunteer_id)).encode())
    secret = json.dumps(api.gw.issuer.current.jwk()).encode()
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def test_refresh_gives_a_new_access_token_to_active_volunteers_only(api: Api) -> None:
    api.submit(job("a"))
    v = api.volunteer()
    r = api.client.post("/api/v1/auth/refresh", headers=v.auth)
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["access_token"] != v.token and fresh["expires_in"] == api.gw.settings.access_token_ttl_s
    assert api.gw.issuer.verify(fresh["access_token"]).volunteer_id == v.id
    c = schema.credentials
    jti = jwt.decode(fresh["access_token"], options={"verify_signature": False})["jti"]
    assert api.count(c, c.c.jti == jti, c.c.kind == "access", c.c.volunteer_id == v.id) == 1
    (task,) = v.work()
    upload = {"Authorization": f"Bearer {task['upload_token']}"}
    assert_error(api.client.post("/api/v1/auth/refresh", headers=upload), 403, "compute scopes")
    assert_error(api.client.post("/api/v1/auth/refresh"), 401)
    api.op("POST", f"/api/v1/volunteers/{v.id}/block")
    assert_error(api.client.post("/api/v1/auth/refresh", headers=v.auth), 403, "blocked")
