"""HTTPS mode: a volunteer authenticates with its X.509 proxy instead of a bearer token, against a real
`airlock serve` process; forged and revoked chains are refused."""

from __future__ import annotations

import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from airlock.agent.proxy import basic_auth, fetch_proxy
from airlock.api.process import free_port, stop_process
from airlock.credentials.ca import init_ca, load_ca
from airlock.credentials.vccs import PCI_INHERIT_ALL, PROXY_CERT_INFO

from .helpers import OPERATOR_TOKEN, PASSWORD, job
from .test_vccs import DN

OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def server_certificate(keys_dir: Path, out: Path) -> tuple[Path, Path]:
    ca = load_ca(keys_dir, DN)
    key = rsa.generate_private_key(65537, 2048)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca.key, hashes.SHA256())
    )
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.chain_pem())
    (out / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (out / "ca.pem").write_bytes(ca.chain_pem())
    return out / "server.pem", out / "server.key"


def client(ca: Path, url: str, cert: Path | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return httpx.Client(base_url=url, verify=ctx, timeout=30)


@pytest.fixture
def https_gateway(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data = tmp_path / "data"
    init_ca(data / "keys", DN, datetime.now(UTC))
    cert, key = server_certificate(data / "keys", tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    env.update(
        AIRLOCK_DATA_DIR=str(data), AIRLOCK_OPERATOR_TOKEN=OPERATOR_TOKEN, AIRLOCK_CA_DN_BASE=DN,
        AIRLOCK_TLS_CERT_FILE=str(cert), AIRLOCK_TLS_KEY_FILE=str(key), AIRLOCK_BACKGROUND="false",
        AIRLOCK_PUBLIC_URL=url,
    )  # fmt: skip
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airlock", "serve", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        with client(tmp_path / "ca.pem", url) as c:
            while True:
                assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                    time.sleep(0.2)
        yield url, tmp_path
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_volunteer_authenticates_with_its_proxy(https_gateway: tuple[str, Path]) -> None:
    url, tmp = https_gateway
    ca = tmp / "ca.pem"
    with client(ca, url) as anon:
        r = anon.post("/api/v1/volunteers", json={"name": "alice", "password": PASSWORD}, headers=OP)
        assert r.status_code == 201, r.text
        vid = r.json()["id"]
        assert (
            anon.post("/api/v1/batches", json={"name": "b", "jobs": [job("j")]}, headers=OP).status_code
            == 201
        )
        proxy = fetch_proxy(anon, basic_auth("alice", PASSWORD), tmp / "x509up")
        assert anon.post("/api/v1/work", json={"host_id": 1}).status_code == 401  # no token, no certificate

    with client(ca, url, tmp / "x509up") as me:
        r = me.post("/api/v1/hosts", json={"platform": "x86_64-pc-linux-gnu", "cores": 1, "memory_mb": 1000,
                                           "disk_mb": 1000})  # fmt: skip
        assert r.status_code == 201, r.text
        host_id = r.json()["host_id"]
        r = me.post("/api/v1/work", json={"host_id": host_id})
        assert r.status_code == 200, r.text
        (task,) = r.json()["tasks"]
        assert task["upload_token"]

    # A proxy the volunteer signed itself, naming another volunteer: the TLS handshake refuses it.
    forged = _forge(tmp / "x509up", f"CN=1,CN={vid + 1},OU=Volunteers,DC=example,DC=org", tmp / "forged")
    with client(ca, url, forged) as evil, pytest.raises(httpx.HTTPError):
        evil.post("/api/v1/work", json={"host_id": host_id})

    # An operator revokes that one proxy: refused; a new proxy (same EEC) works.
    with client(ca, url) as anon:
        r = anon.post(f"/api/v1/ca/issued/{proxy.serial}/revoke", headers=OP)
        assert r.status_code == 200, r.text
    with client(ca, url, tmp / "x509up") as me:
        assert me.post("/api/v1/work", json={"host_id": host_id}).status_code == 403
    with client(ca, url) as anon:
        fetch_proxy(anon, basic_auth("alice", PASSWORD), tmp / "x509up")
    with client(ca, url, tmp / "x509up") as me:
        assert me.post("/api/v1/work", json={"host_id": host_id}).status_code == 200

    # Blocked: its certificate is refused at once.
    with client(ca, url) as anon:
        assert anon.post(f"/api/v1/volunteers/{vid}/block", headers=OP).status_code == 200
    with client(ca, url, tmp / "x509up") as me:
        r = me.post("/api/v1/work", json={"host_id": host_id})
        assert r.status_code == 403 and "revoked" in r.json()["message"], r.text
    assert proxy.identity.endswith(f"CN={vid}")


def _forge(proxy_file: Path, subject: str, out: Path) -> Path:
    data = proxy_file.read_bytes()
    proxy, eec = x509.load_pem_x509_certificates(data)
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(proxy.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO, PCI_INHERIT_ALL), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    out.write_bytes(cert.public_bytes(pem) + key_pem + proxy.public_bytes(pem) + eec.public_bytes(pem))
    return out
