"""Credentials on both databases: token verification, scopes and lifetimes, login, block and unblock, the
operator/volunteer separation, and that no trusted credential ever reaches a volunteer host."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.routing import APIRoute

from airlock.api import deps
from airlock.api.credentials import router as credentials_router
from airlock.api.operator import router as operator_router
from airlock.core.checksums import digest_bytes
from airlock.credentials.tokens import COMPUTE_SCOPES
from airlock.db import schema
from airlock.db.engine import utcnow

from .helpers import OPERATOR_TOKEN, PASSWORD, Api, Volunteer, assert_error, job

# ------------------------------------------------------------------------------------------------ helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(api: Api, volunteer_id: int, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "wlcg.ver": "1.0",
        "iss": api.gw.issuer.issuer,
        "sub": str(volunteer_id),
        "aud": api.gw.issuer.audience,
        "scope": " ".join(COMPUTE_SCOPES),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    for k, v in over.items():
        k = k.replace("__", ".")
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def sign(api: Api, payload: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None, **hdr: Any) -> str:
    current = api.gw.issuer.current
    headers = {"kid": current.kid, **hdr}
    return jwt.encode(payload, key or current.private, algorithm="ES256", headers=headers)


def work(api: Api, v: Volunteer, token: str) -> Any:
    return api.client.post(
        "/api/v1/work", json={"host_id": v.host_id, "slots": 1}, headers={"Authorization": f"Bearer {token}"}
    )


def decode_unverified(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


# ------------------------------------------------------------------------------------- token verification


def test_a_correctly_crafted_token_is_accepted(api: Api) -> None:
    """The baseline for the forgeries below: the same construction with the real key works."""
    v = api.volunteer()
    assert work(api, v, sign(api, claims(api, v.id))).status_code == 200


def test_alg_none_token_is_refused(api: Api) -> None:
    v = api.volunteer()
    for alg in ("none", "None", "NONE"):
        token = f"{b64url_json({'alg': alg, 'typ': 'JWT'})}.{b64url_json(claims(api, v.id))}."
        body = assert_error(work(api, v, token), 401, "algorithm", alg)
        assert body["error"] == "unauthorized"


def test_hs256_signed_with_the_public_key_is_refused(api: Api) -> None:
    """Algorithm confusion: HMAC keyed with the (public) verification key in its usual encodings."""
    v = api.volunteer()
    public = api.gw.issuer.current.public
    secrets = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
        json.dumps(api.gw.issuer.current.jwk()).encode(),
    ]
    for secret in secrets:
        for alg, mod in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            head = b64url_json({"alg": alg, "typ": "JWT", "kid": api.gw.issuer.current.kid})
            signing_input = f"{head}.{b64url_json(claims(api, v.id))}"
            sig = b64url(hmac.new(secret, signing_input.encode(), mod).digest())
            assert_error(work(api, v, f"{signing_input}.{sig}"), 401, "algorithm", alg)


def test_token_from_another_key_is_refused(api: Api) -> None:
    v = api.volunteer()
    other = ec.generate_private_key(ec.SECP256R1())
    # with its own key id: unknown key
    assert_error(work(api, v, sign(api, claims(api, v.id), other, kid="attacker")), 401, "unknown key")
    # without a key id
    no_kid = jwt.encode(claims(api, v.id), other, algorithm="ES256")
    assert_error(work(api, v, no_kid), 401, "unknown key")
    # claiming the gateway's key id: the signature does not verify
    assert_error(work(api, v, sign(api, claims(api, v.id), other)), 401, "signature")
    # and a token of another issuer, even signed by our key
    assert_error(work(api, v, sign(api, claims(api, v.id, iss="https://evil.example"))), 401, "issuer")


def test_wrong_audience_expired_and_not_yet_valid_are_refused(api: Api) -> None:
    v = api.volunteer()
    now = int(time.time())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"aud": "https://other.example"}, "audience"),
        ({"aud": ["https://other.example", "x"]}, "audience"),
        ({"iat": now - 7200, "nbf": now - 7200, "exp": now - 60}, "expired"),
        ({"nbf": now + 3600}, "not yet valid"),
    ]
    for over, fragment in cases:
        assert_error(work(api, v, sign(api, claims(api, v.id, **over))), 401, fragment)


def test_missing_claims_are_refused(api: Api) -> None:
    v = api.volunteer()
    for claim in ("exp", "iat", "nbf", "sub", "jti", "iss", "aud"):
        token = sign(api, claims(api, v.id, **{claim: None}))
        assert_error(work(api, v, token), 401, f'"{claim}"')


def test_non_wlcg_tokens_and_bad_subjects_are_refused(api: Api) -> None:
    v = api.volunteer()
    assert_error(work(api, v, sign(api, claims(api, v.id, wlcg__ver=None))), 401, "WLCG")
    assert_error(work(api, v, sign(api, claims(api, v.id, wlcg__ver="2.0"))), 401, "WLCG")
    assert_error(work(api, v, sign(api, claims(api, v.id, sub="admin"))), 401, "subject")
    r = work(api, v, sign(api, claims(api, 999_999)))  # well signed, but nobody's
    assert r.status_code in (401, 403), r.text
    assert_error(r, r.status_code)


def test_missing_compute_scope_is_refused(api: Api) -> None:
    v = api.volunteer()
    for scope in (None, "", "compute.read", "compute.read compute.modify", "storage.create:/"):
        r = work(api, v, sign(api, claims(api, v.id, scope=scope)))
        assert_error(r, 403, "compute scopes")


def test_garbage_tokens_are_refused(api: Api) -> None:
    v = api.volunteer()
    garbage = [
        "x",
        "a.b.c",
        "....",
        "eyJhbGciOiJFUzI1NiJ9",
        "eyJhbGciOiJFUzI1NiJ9.e30.",
        "null",
        "Ω≈ç√",
        v.token[:-4],  # truncated signature
        v.token + "AAAA",
        OPERATOR_TOKEN,
    ]
    for token in garbage:
        r = api.client.post(
            "/api/v1/work",
            json={"host_id": v.host_id},
            headers={"Authorization": f"Bearer {token}".encode()},
        )
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    for header in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        r = api.client.post("/api/v1/work", json={"host_id": v.host_id}, headers=header)
        assert_error(r, 401, "missing bearer token")


def test_jwks_publishes_the_public_key_only(api: Api) -> None:
    r = api.client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    (key,) = r.json()["keys"]
    assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert "d" not in key and key["kty"] == "EC" and key["alg"] == "ES256"
    # it verifies the gateway's tokens
    v = api.volunteer()
    public = jwt.PyJWK(key).key
    jwt.decode(v.token, public, algorithms=["ES256"], audience=api.gw.issuer.audience)
    d = api.gw.issuer.current.private.private_numbers().private_value
    assert b64url(d.to_bytes(32, "big")) not in r.text


# -------------------------------------------------------------------------------------- scopes, lifetimes


def test_access_token_lifetime_and_scopes(api: Api) -> None:
    v = api.volunteer()
    r = api.client.post("/api/v1/auth/token", json={"username": v.name, "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    ttl = api.gw.settings.access_token_ttl_s
    assert body["expires_in"] == ttl and body["token_type"] == "bearer"
    assert body["scope"] == "compute.read compute.modify compute.create"
    c = decode_unverified(body["access_token"])
    assert c["exp"] - c["iat"] == ttl and c["nbf"] == c["iat"]
    assert abs(c["iat"] - time.time()) < 60
    assert c["scope"].split() == ["compute.read", "compute.modify", "compute.create"]
    assert (c["sub"], c["wlcg.ver"], c["iss"], c["aud"]) == (
        str(v.id),
        "1.0",
        api.gw.issuer.issuer,
        api.gw.issuer.audience,
    )
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "ES256"


def test_upload_token_is_narrow_and_refused_as_an_access_token(api: Api) -> None:
    api.submit(job("a", deadline_s=7200))
    v = api.volunteer()
    (t,) = v.work()
    c = decode_unverified(t["upload_token"])
    assert c["scope"] == f"storage.create:/quarantine/{v.id}/{t['task_id']}"
    assert c["sub"] == str(v.id)
    assert abs((c["exp"] - c["iat"]) - 1800) <= 1  # upload_token_ttl_s, well before the deadline
    before = api.snapshot()
    up = {"Authorization": f"Bearer {t['upload_token']}"}
    assert_error(work(api, v, t["upload_token"]), 403, "compute scopes")
    hb = api.client.post(f"/api/v1/tasks/{t['task_id']}/heartbeat", json={"host_id": v.host_id}, headers=up)
    assert_error(hb, 403, "compute scopes")
    rep = api.client.post(
        f"/api/v1/tasks/{t['task_id']}/report", json={"host_id": v.host_id, "exit_code": 0}, headers=up
    )
    assert_error(rep, 403, "compute scopes")
    assert_error(api.client.post("/api/v1/hosts", json={}, headers=up), 403)
    assert api.snapshot() == before


def test_heartbeats_renew_the_short_upload_token_never_past_the_deadline(api: Api) -> None:
    api.submit(job("long", deadline_s=7200), job("short", deadline_s=600))
    v = api.volunteer()
    long_task, short_task = sorted(v.work(slots=2), key=lambda t: t["task_id"])
    short = decode_unverified(short_task["upload_token"])
    assert abs((short["exp"] - short["iat"]) - 600) <= 1  # the deadline comes first
    first = decode_unverified(long_task["upload_token"])
    hb = v.heartbeat(long_task)
    assert hb.status_code == 200, hb.text
    fresh = hb.json()["upload_token"]
    c = decode_unverified(fresh)
    assert c["scope"] == first["scope"] == f"storage.create:/quarantine/{v.id}/{long_task['task_id']}"
    assert c["jti"] != first["jti"] and abs((c["exp"] - c["iat"]) - 1800) <= 1
    cr = schema.credentials
    assert api.count(cr, cr.c.kind == "upload", cr.c.task_id == long_task["task_id"]) == 2  # both on record
    assert v.upload(long_task, b"42\n", token=fresh).status_code == 201  # the new one works
    assert v.report(long_task, 0, {"out.txt": b"42\n"}).status_code == 200
    assert_error(v.heartbeat(long_task), 410)  # no lease, no new token


def test_login_failures_look_the_same(api: Api) -> None:
    v = api.volunteer()
    wrong = api.client.post("/api/v1/auth/token", json={"username": v.name, "password": "not the password"})
    unknown = api.client.post("/api/v1/auth/token", json={"username": "nobody-here", "password": PASSWORD})
    a = assert_error(wrong, 401, "wrong user name or password")
    b = assert_error(unknown, 401)
    assert a == b


# ------------------------------------------------------------------------------------ block and unblock


def _volunteer_calls(api: Api, v: Volunteer, t: dict[str, Any], sha: str) -> dict[str, Any]:
    return {
        "work": v.request(),
        "hosts": api.client.post(
            "/api/v1/hosts", json={"platform": "p", "cores": 1, "memory_mb": 1, "disk_mb": 1}, headers=v.auth
        ),
        "heartbeat": v.heartbeat(t),
        "report": v.report(t, 0, {"out.txt": b"1\n"}),
        "upload": v.upload(t, b"1\n"),
        "input": api.client.get(f"/api/v1/inputs/{sha}", headers=v.auth),
    }


def test_blocked_volunteer_is_refused_everywhere_at_once(api: Api) -> None:
    data = b"input bytes\n"
    sha = api.op("POST", "/api/v1/inputs", content=data).json()["sha256"]
    (jid,) = api.submit(job("a", inputs=[{"name": "in.dat", "sha256": sha}]))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    r = api.op("POST", f"/api/v1/volunteers/{v.id}/block")
    assert r.status_code == 200 and r.json() == {"state": "blocked"}
    before = api.snapshot()
    for what, r in _volunteer_calls(api, v, t, sha).items():
        assert_error(r, 403, "blocked")
        assert data not in r.content, what
    assert api.snapshot() == before
    # cannot log in either
    r = api.client.post("/api/v1/auth/token", json={"username": v.name, "password": PASSWORD})
    assert_error(r, 403, "blocked")
    # its leased task went back: lost, and a replacement is ready for someone else
    view = api.job(jid)
    assert [(x["state"], x["volunteer_id"]) for x in view["tasks"]] == [("lost", v.id), ("ready", None)]
    assert view["attempts"] == 2
    other = api.volunteer()
    (t2,) = other.work()
    assert t2["job_id"] == jid and t2["task_id"] == view["tasks"][1]["id"]
    listed = {x["id"]: x["state"] for x in api.op("GET", "/api/v1/volunteers").json()}
    assert listed[v.id] == "blocked" and listed[other.id] == "active"


def test_unblock_restores_the_volunteer(api: Api) -> None:
    api.submit(job("a"), job("b"))
    v = api.volunteer()
    assert api.op("POST", f"/api/v1/volunteers/{v.id}/block").status_code == 200
    assert_error(v.request(), 403, "blocked")
    r = api.op("POST", f"/api/v1/volunteers/{v.id}/block")  # blocking twice is a clear conflict
    assert_error(r, 409)
    assert api.op("POST", f"/api/v1/volunteers/{v.id}/unblock").json() == {"state": "active"}
    v.login()
    (t,) = v.work()
    v.complete(t)
    api.settle()
    assert api.job(t["job_id"])["state"] == "done"
    assert_error(api.op("POST", "/api/v1/volunteers/999999/block"), 404, "no volunteer 999999")


# ------------------------------------------------------------------------- operator / volunteer separation


def test_operator_token_is_not_a_volunteer_token(api: Api) -> None:
    api.submit(job("a"))
    v = api.volunteer()
    before = api.snapshot()
    for path, body in (
        ("/api/v1/work", {"host_id": v.host_id}),
        ("/api/v1/hosts", {"platform": "p", "cores": 1, "memory_mb": 1, "disk_mb": 1}),
        ("/api/v1/tasks/1/heartbeat", {"host_id": v.host_id}),
        ("/api/v1/tasks/1/report", {"host_id": v.host_id, "exit_code": 0}),
    ):
        r = api.op("POST", path, json=body)
        assert r.status_code in (401, 403), (path, r.text)
        assert_error(r, r.status_code)
    assert api.snapshot() == before


def _uses(dependant: Any, call: Any) -> bool:
    return any(d.call is call or _uses(d, call) for d in dependant.dependencies)


# Every operation the gateway publishes that is NOT for operators; anything else must be operator-only.
NOT_OPERATOR = {
    ("GET", "/healthz"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/api/v1/volunteers/register"),
    ("POST", "/api/v1/auth/token"),
    ("POST", "/api/v1/hosts"),
    ("POST", "/api/v1/work"),
    ("POST", "/api/v1/tasks/{task_id}/heartbeat"),
    ("POST", "/api/v1/tasks/{task_id}/report"),
    ("GET", "/api/v1/inputs/{sha256}"),
    ("PUT", "/quarantine/{volunteer_id}/{task_id}/{name}"),
    ("GET", "/.well-known/openid-configuration"),
    ("POST", "/api/v1/credentials/x509"),
    ("POST", "/api/v1/auth/refresh"),
    ("GET", "/api/v1/ca/certificate"),
    ("GET", "/api/v1/ca/crl"),
    # the BOINC project (its own credentials: the account key, signed names and addresses)
    ("GET", "/boinc/"),
    ("POST", "/boinc/cgi"),
    ("GET", "/boinc/download/{mac}/{sha256}"),
    ("GET", "/boinc/apps/{app}/{version}/{platform}/{name}"),
    ("POST", "/boinc/file_upload_handler"),
    ("GET", "/boinc/lookup_account.php"),
    ("GET", "/boinc/get_project_config.php"),
}


def operator_routes(api: Api) -> list[tuple[str, str]]:
    """The operator operations, from the OpenAPI document, cross-checked against the operator router."""
    spec = api.client.get("/openapi.json").json()
    published = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    routes = {
        (m, r.path)
        for r in (*operator_router.routes, *credentials_router.routes)
        if isinstance(r, APIRoute) and _uses(r.dependant, deps.operator)
        for m in r.methods or ()
    }
    assert routes == published - NOT_OPERATOR, "a route is neither operator-only nor known to be public"
    everything = {
        (m, r.path) for r in operator_router.routes if isinstance(r, APIRoute) for m in r.methods or ()
    }
    assert routes >= everything
    return sorted(routes)


def test_volunteer_tokens_work_on_no_operator_endpoint(api: Api) -> None:
    data = b"an input\n"
    sha = api.op("POST", "/api/v1/inputs", content=data).json()["sha256"]
    batch = api.submit(job("a", inputs=[{"name": "in.dat", "sha256": sha}]))
    (jid,) = batch["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    v.complete(t)
    api.settle()
    assert api.job(jid)["state"] == "done"
    result_sha = digest_bytes(b"42\n").sha256

    routes = operator_routes(api)
    assert len(routes) >= 15
    params = {
        "batch_id": batch["batch_id"], "job_id": jid, "volunteer_id": v.id, "name": "out.txt", "serial": "1"
    }  # fmt: skip
    tokens = {
        "access": v.token,
        "upload": t["upload_token"],
        "crafted-all-scopes": api.gw.issuer.issue(
            v.id, [*COMPUTE_SCOPES, "storage.read:/", "storage.create:/", "storage.modify:/"], utcnow(),
            timedelta(hours=1),
        ).token,
    }  # fmt: skip
    before = api.snapshot()
    for method, path in routes:
        url = path.format(**params)
        for who, token in tokens.items():
            r = api.client.request(
                method,
                url,
                headers={"Authorization": f"Bearer {token}"},
                content=b'{"name": "x", "password": "12345678", "jobs": []}' if method == "POST" else None,
            )
            assert r.status_code in (401, 403), (method, url, who, r.status_code, r.text)
            assert_error(r, r.status_code, "operator token")
            assert r.content != b"42\n" and result_sha not in r.text, (method, url)
    assert api.snapshot() == before
    # the volunteer is still active: no self-unblock / self-block went through
    listed = {x["id"]: x["state"] for x in api.op("GET", "/api/v1/volunteers").json()}
    assert listed[v.id] == "active"


# --------------------------------------------------------------- invariant 1: trusted credentials stay home


def _secrets(api: Api) -> dict[str, str]:
    key = api.gw.issuer.current.private
    d = key.private_numbers().private_value
    raw = d.to_bytes(32, "big")
    pem_path = api.gw.settings.keys_dir / f"token-{api.gw.issuer.current.kid}.pem"
    pem = pem_path.read_text()
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out = {
        "operator token": OPERATOR_TOKEN,
        "private pem": pem.strip(),
        "private der base64": base64.b64encode(der).decode(),
        "scalar hex": raw.hex(),
        "scalar HEX": raw.hex().upper(),
        "scalar base64url": b64url(raw),
        "scalar base64": base64.b64encode(raw).decode().rstrip("="),
        "scalar decimal": str(d),
    }
    for i, line in enumerate(pem.splitlines()):
        if len(line) >= 20 and not line.startswith("-----"):
            out[f"pem line {i}"] = line
    return out


JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _texts(resp: httpx.Response) -> list[str]:
    """The reply as a volunteer sees it: headers, body, and the decoded parts of any JWT in it."""
    body = resp.content.decode("latin-1")
    texts = [body, "\n".join(f"{k}: {v}" for k, v in resp.headers.multi_items())]
    for token in JWT_RE.findall(body + texts[1]):
        for part in token.split(".")[:2]:
            texts.append(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("latin-1"))
    return texts


@pytest.mark.parametrize("settings_overrides", [{"open_registration": True}])
def test_no_trusted_credential_ever_reaches_a_volunteer(api: Api) -> None:
    secrets = _secrets(api)
    seen: list[httpx.Response] = []

    def record(resp: httpx.Response) -> None:
        if resp.request.headers.get("authorization") == f"Bearer {OPERATOR_TOKEN}":
            return  # the operator's own traffic stays in the trusted domain
        resp.read()
        seen.append(resp)

    api.client.event_hooks = {"request": [], "response": [record]}

    input_data = b"the input of the job\n"
    sha = api.op("POST", "/api/v1/inputs", content=input_data).json()["sha256"]
    (jid,) = api.submit(
        job("a", inputs=[{"name": "in.dat", "sha256": sha}], env={"MODE": "test"}, params={"n": 1})
    )["jobs"]

    # public endpoints
    for path in ("/healthz", "/.well-known/jwks.json", "/openapi.json", "/docs", "/redoc", "/nonexistent"):
        api.client.get(path)
    # a volunteer registers itself, logs in (after a failed attempt), registers a host, works
    r = api.client.post("/api/v1/volunteers/register", json={"name": "selfreg", "password": PASSWORD})
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    api.client.post("/api/v1/auth/token", json={"username": "selfreg", "password": "wrong password"})
    r = api.client.post("/api/v1/auth/token", json={"username": "selfreg", "password": PASSWORD})
    v = Volunteer(api, vid, "selfreg", token=r.json()["access_token"])
    v.register_host(cores=2, memory_mb=4000, disk_mb=10_000)
    (t,) = v.work()
    assert "OPERATOR" not in json.dumps(t).upper() and OPERATOR_TOKEN not in json.dumps(t)
    assert t["env"] == {"MODE": "test"}
    upload_claims = decode_unverified(t["upload_token"])
    assert upload_claims["scope"] == f"storage.create:/quarantine/{vid}/{t['task_id']}"
    assert v.heartbeat(t).status_code == 200
    (inp,) = t["inputs"]
    r = api.client.get(inp["url"].replace("http://testserver", ""), headers=v.auth)
    assert r.status_code == 200 and r.content == input_data
    assert digest_bytes(r.content).sha256 == inp["sha256"]
    # some refusals too: error messages must not leak either
    api.client.get(t["outputs"][0]["upload_url"], headers={"Authorization": f"Bearer {t['upload_token']}"})
    v.upload(t, b"x", digest_of=b"y")
    api.client.post("/api/v1/batches", json={}, headers=v.auth)
    api.client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {t['upload_token']}"})
    api.client.post("/api/v1/work", content=b"{not json", headers=v.auth)
    # the honest result
    r = v.upload(t, b"result\n")
    assert r.status_code == 201, r.text
    assert v.report(t, 0, {"out.txt": b"result\n"}).status_code == 200
    assert v.work() == []
    api.settle()
    assert api.job(jid)["state"] == "done"

    assert len(seen) >= 20
    # the detector itself works, even on a secret hidden inside a token's payload
    canary = f"{b64url_json({'alg': 'ES256'})}.{b64url_json({'x': OPERATOR_TOKEN})}.sig"
    fake = httpx.Response(200, json={"token": canary}, request=seen[0].request)
    assert any(OPERATOR_TOKEN in text for text in _texts(fake))
    for resp in seen:
        for text in _texts(resp):
            for what, secret in secrets.items():
                assert secret not in text, f"{what} leaked in {resp.request.method} {resp.request.url}"


def test_registration_is_closed_unless_the_operator_opens_it(api: Api) -> None:
    assert api.gw.settings.open_registration is False
    before = api.snapshot()
    r = api.client.post("/api/v1/volunteers/register", json={"name": "walkin", "password": PASSWORD})
    assert_error(r, 403, "registration is closed")
    r = api.client.post("/api/v1/auth/token", json={"username": "walkin", "password": PASSWORD})
    assert_error(r, 401, "wrong user name or password")
    assert api.snapshot() == before


def test_tokens_the_issuer_signed_verify_as_a_fresh_verifier_sees_them(api: Api) -> None:
    """The issuer remembers what it signed (so an upload skips the signature check): what it answers
    from memory is what a verifier that never saw the token answers, including for an expired one."""
    from airlock.credentials.tokens import TokenIssuer

    issuer = api.gw.issuer
    fresh = TokenIssuer(issuer.issuer, issuer.keys, issuer.audience)
    scopes = ["storage.create:/quarantine/7/99"]
    live = issuer.issue(7, scopes, utcnow(), timedelta(minutes=10))
    remembered, checked = issuer.verify(live.token), fresh.verify(live.token)
    assert (remembered.volunteer_id, remembered.scopes, remembered.jti, remembered.expires) == (
        checked.volunteer_id,
        checked.scopes,
        checked.jti,
        checked.expires,
    )
    assert remembered.raw == checked.raw
    dead = issuer.issue(7, scopes, utcnow() - timedelta(hours=2), timedelta(minutes=10))
    for verifier in (issuer, fresh):
        with pytest.raises(Exception, match="expired"):
            verifier.verify(dead.token)
    head, _body, sig = live.token.split(".")
    forged = ".".join([head, b64url_json({**checked.raw, "scope": "storage.create:/quarantine"}), sig])
    with pytest.raises(Exception, match="invalid token"):
        issuer.verify(forged)
