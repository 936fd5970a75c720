"""VCCS: proxies issued from a volunteer's CSR, checked by the real grid tools (openssl, grid-proxy-info,
voms-proxy-info); the cache, the Credential rows, logins and bad CSRs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from airlock.agent.proxy import basic_auth, new_request, write_proxy_file
from airlock.credentials.ca import init_ca
from airlock.credentials.vccs import PCI_INHERIT_ALL, PROXY_CERT_INFO
from airlock.db import schema

from .helpers import PASSWORD, Api, Volunteer, assert_error

DN = "/DC=org/DC=example"
URL = "/api/v1/credentials/x509"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed (make test installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture(name="settings_overrides")
def ca_settings_fixture() -> dict[str, Any]:
    return {"ca_dn_base": DN}


@pytest.fixture(name="ca_api")
def ca_api_fixture(api: Api) -> Api:
    """A gateway with an online CA (test_ca.py uses it too)."""
    init_ca(api.gw.settings.keys_dir, DN, datetime.now(UTC))
    return api


def csr_pem(key: Any, subject: x509.Name | None = None, extension: x509.ExtensionType | None = None) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if extension is not None:
        b = b.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def get_proxy(api: Api, v: Volunteer, tmp: Path) -> tuple[dict[str, Any], Path]:
    key, csr = new_request()
    r = api.client.post(URL, json={"csr": csr}, headers=v.auth)
    assert r.status_code == 200, r.text
    reply: dict[str, Any] = r.json()
    tmp.mkdir(exist_ok=True)
    (tmp / "ca.pem").write_text(reply["ca_chain"])
    (tmp / "eec.pem").write_text(reply["eec"])
    (tmp / "proxy.pem").write_text(reply["proxy"])
    write_proxy_file(tmp / "x509up", reply["proxy"], key, reply["eec"])
    return reply, tmp / "x509up"


def openssl_verify(d: Path, *extra: str, proxy: str = "proxy.pem", untrusted: str = "eec.pem") -> str:
    r = subprocess.run(
        [need("openssl"), "verify", "-allow_proxy_certs", "-CAfile", str(d / "ca.pem"), "-untrusted",
         str(d / untrusted), *extra, str(d / proxy)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return r.stdout + r.stderr


def cert_dir(d: Path) -> Path:
    """X509_CERT_DIR: every CA certificate as <subject_hash>.0."""
    out = d / "certificates"
    out.mkdir(exist_ok=True)
    for pem in (d / "ca.pem").read_text().split("-----END CERTIFICATE-----")[:-1]:
        body = pem.strip() + "\n-----END CERTIFICATE-----\n"
        h = subprocess.run(
            ["openssl", "x509", "-noout", "-subject_hash"],
            input=body,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (out / f"{h}.0").write_text(body)
    return out


def test_proxy_passes_openssl_grid_proxy_info_and_voms_proxy_info(ca_api: Api, tmp_path: Path) -> None:
    v = ca_api.volunteer()
    reply, proxy_file = get_proxy(ca_api, v, tmp_path)
    identity = f"{DN}/OU=Volunteers/CN={v.id}"
    assert reply["identity"] == identity
    assert reply["subject"].startswith(identity + "/CN=")
    assert "OK" in openssl_verify(tmp_path)
    assert (proxy_file.stat().st_mode & 0o777) == 0o600

    info = subprocess.run(
        [need("grid-proxy-info"), "-f", str(proxy_file)], capture_output=True, text=True, timeout=30
    )
    assert info.returncode == 0, info.stderr
    assert "RFC 3820 compliant impersonation proxy" in info.stdout
    assert f"identity : {identity}" in info.stdout

    env = {**os.environ, "X509_CERT_DIR": str(cert_dir(tmp_path))}
    voms = subprocess.run(
        [need("voms-proxy-info"), "--file", str(proxy_file), "--all"], capture_output=True, text=True,
        timeout=30, env=env,
    )  # fmt: skip
    assert voms.returncode == 0, voms.stdout + voms.stderr
    assert identity in voms.stdout
    assert "RFC compliant proxy" in voms.stdout


def test_forged_proxies_are_refused(ca_api: Api, tmp_path: Path) -> None:
    """A volunteer signing, with its proxy key, a proxy that names another volunteer; and a proxy without
    the ProxyCertInfo extension: OpenSSL refuses both."""
    v = ca_api.volunteer()
    reply, proxy_file = get_proxy(ca_api, v, tmp_path)
    proxy = x509.load_pem_x509_certificate(reply["proxy"].encode())
    key = serialization.load_pem_private_key(proxy_file.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    victim = x509.Name.from_rfc4514_string(f"CN=1,CN={v.id + 1},OU=Volunteers,DC=example,DC=org")

    def forge(subject: x509.Name, pci: bool) -> str:
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(proxy.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
            .not_valid_after(datetime.now(UTC) + timedelta(hours=1))
        )
        if pci:
            b = b.add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO, PCI_INHERIT_ALL), critical=True)
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    (tmp_path / "chain.pem").write_text(reply["proxy"] + reply["eec"])
    (tmp_path / "forged.pem").write_text(forge(victim, pci=True))
    out = openssl_verify(tmp_path, proxy="forged.pem", untrusted="chain.pem")
    assert "OK" not in out.splitlines()[-1] and "proxy subject name violation" in out, out

    own = x509.Name(
        [*proxy.subject.rdns, x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "7")])]
    )
    (tmp_path / "nopci.pem").write_text(forge(own, pci=False))
    out = openssl_verify(tmp_path, proxy="nopci.pem", untrusted="chain.pem")
    assert "error" in out and not out.strip().endswith("OK"), out
    # The honest chain still verifies: the refusals above are about the forgeries.
    (tmp_path / "honest.pem").write_text(forge(own, pci=True))
    assert openssl_verify(tmp_path, proxy="honest.pem", untrusted="chain.pem").strip().endswith("OK")


def test_eec_is_cached_and_every_issuance_recorded(ca_api: Api, tmp_path: Path) -> None:
    v = ca_api.volunteer()
    first, _ = get_proxy(ca_api, v, tmp_path / "a")
    second, _ = get_proxy(ca_api, v, tmp_path / "b")
    assert first["eec"] == second["eec"]  # signed once per validity window
    assert first["serial"] != second["serial"]
    c = schema.credentials
    assert ca_api.count(c, c.c.kind == "x509", c.c.volunteer_id == v.id) == 3  # one EEC, two proxies
    for reply in (first, second):
        assert ca_api.count(c, c.c.jti == reply["serial"], c.c.kind == "x509") == 1
    eec = x509.load_pem_x509_certificate(first["eec"].encode())
    assert ca_api.count(c, c.c.jti == f"{eec.serial_number:x}") == 1
    lifetime = eec.not_valid_after_utc - eec.not_valid_before_utc
    assert timedelta(days=7) <= lifetime <= timedelta(days=7, minutes=6)  # the paper's 7 days by default
    proxy = x509.load_pem_x509_certificate(first["proxy"].encode())
    assert proxy.not_valid_after_utc - proxy.not_valid_before_utc <= timedelta(hours=12, minutes=6)
    # The EEC key stays in the gateway's keys folder, mode 0600.
    stored = ca_api.gw.settings.keys_dir / "ca" / "eec" / f"{v.id}.pem"
    assert (stored.stat().st_mode & 0o777) == 0o600
    # Invariant 1: neither the EEC's key nor the CA's reaches the volunteer, in any encoding we hold.
    secrets = [stored.read_text().split("-----BEGIN PRIVATE KEY-----")[1].split("-----END")[0]]
    secrets.append((ca_api.gw.settings.keys_dir / "ca" / "issuing.key").read_text().split("-----")[2])
    for reply in (first, second):
        flat = json.dumps(reply).replace("\\n", "").replace("\n", "")
        for secret in secrets:
            body = secret.replace("\n", "")
            assert body[:64] not in flat and body[-64:] not in flat
    # The operator sees what was issued.
    listed = ca_api.op("GET", "/api/v1/ca/issued", params={"volunteer": v.id}).json()
    assert sorted(i["type"] for i in listed) == ["eec", "proxy", "proxy"]
    shown = ca_api.op("GET", f"/api/v1/ca/issued/{first['serial']}").json()
    assert shown["subject"] == first["subject"] and shown["revoked"] is False
    assert_error(ca_api.client.get("/api/v1/ca/issued"), 401)


def test_logins_basic_authenticator_and_refusals(ca_api: Api) -> None:
    v = ca_api.volunteer()
    _, csr = new_request()
    assert ca_api.client.post(URL, json={"csr": csr}, headers=basic_auth(v.name, PASSWORD)).status_code == 200
    with ca_api.gw.engine.connect() as conn:
        authenticator = (
            conn.execute(schema.volunteers.select().where(schema.volunteers.c.id == v.id)).one().authenticator
        )
    assert ca_api.client.post(URL, json={"csr": csr, "authenticator": authenticator}).status_code == 200
    assert_error(
        ca_api.client.post(URL, json={"csr": csr}, headers=basic_auth(v.name, "wrong")), 401, "password"
    )
    assert_error(ca_api.client.post(URL, json={"csr": csr, "authenticator": "0" * 32}), 401, "authenticator")
    assert_error(ca_api.client.post(URL, json={"csr": csr}), 401, "log in")
    assert_error(
        ca_api.client.post(URL, json={"csr": csr}, headers={"Authorization": "Basic !!"}), 400, "basic"
    )
    assert_error(ca_api.op("POST", URL, json={"csr": csr}), 401)  # the operator token is no volunteer login


def test_proxy_lifetime_is_capped(ca_api: Api) -> None:
    v = ca_api.volunteer()
    _, csr = new_request()
    r = ca_api.client.post(URL, json={"csr": csr, "lifetime_s": 3600}, headers=v.auth)
    proxy = x509.load_pem_x509_certificate(r.json()["proxy"].encode())
    assert abs((proxy.not_valid_after_utc - datetime.now(UTC)) - timedelta(hours=1)) < timedelta(minutes=1)
    r = ca_api.client.post(URL, json={"csr": csr, "lifetime_s": 10**7}, headers=v.auth)
    proxy = x509.load_pem_x509_certificate(r.json()["proxy"].encode())
    assert proxy.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=12)
    assert_error(ca_api.client.post(URL, json={"csr": csr, "lifetime_s": 10}, headers=v.auth), 422)


def test_bad_csrs_get_clear_errors(ca_api: Api) -> None:
    v = ca_api.volunteer()
    own = x509.Name.from_rfc4514_string(f"CN={v.id},OU=Volunteers,DC=example,DC=org")
    other = x509.Name.from_rfc4514_string(f"CN={v.id + 1},OU=Volunteers,DC=example,DC=org")
    rsa_key = rsa.generate_private_key(65537, 2048)
    cases: list[tuple[str, int, str]] = [
        ("hello", 400, "not a PEM certificate signing request"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", 400, "not a PEM"),
        (csr_pem(rsa.generate_private_key(65537, 1024)), 400, "2048"),
        (csr_pem(ed25519.Ed25519PrivateKey.generate()), 400, "must be RSA"),
        (csr_pem(ec.generate_private_key(ec.SECP521R1())), 400, "curve"),
        (csr_pem(rsa_key, other), 403, f"may only get {DN}/OU=Volunteers/CN={v.id}"),
        (csr_pem(rsa_key, extension=x509.BasicConstraints(ca=True, path_length=None)), 400, "extensions"),
        (
            csr_pem(rsa_key, extension=x509.SubjectAlternativeName([x509.DNSName("evil.example")])),
            400,
            "extensions",
        ),
    ]
    # A CSR whose signature does not match: flip a bit in the signature.
    der = bytearray(
        x509.load_pem_x509_csr(csr_pem(rsa_key).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    cases.append((tampered, 400, "signature"))
    before = ca_api.snapshot()
    for pem, status, fragment in cases:
        assert_error(ca_api.client.post(URL, json={"csr": pem}, headers=v.auth), status, fragment)
    assert ca_api.snapshot() == before  # nothing issued, nothing recorded
    # Its own DN and a P-256 key are fine.
    assert ca_api.client.post(URL, json={"csr": csr_pem(rsa_key, own)}, headers=v.auth).status_code == 200
    p256 = csr_pem(ec.generate_private_key(ec.SECP256R1()))
    assert ca_api.client.post(URL, json={"csr": p256}, headers=v.auth).status_code == 200
    assert_error(ca_api.client.post(URL, json={"csr": "x" * 40_000}, headers=v.auth), 422)


def test_without_a_ca_the_endpoints_say_so(api: Api) -> None:
    v = api.volunteer()
    _, csr = new_request()
    assert_error(api.client.post(URL, json={"csr": csr}, headers=v.auth), 404, "airlock ca init")
    assert_error(api.client.get("/api/v1/ca/crl"), 404, "airlock ca init")
