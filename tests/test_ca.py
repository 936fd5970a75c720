"""The online CA: `airlock ca` on a data folder, the published CA certificate and CRL, and revocation when
a volunteer is blocked (CRL, tokens, leased tasks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from airlock.agent.proxy import new_request
from airlock.credentials.ca import load_ca, slash_dn
from airlock.db import schema

from .helpers import Api, assert_error, job
from .test_vccs import DN, URL, ca_api_fixture, ca_settings_fixture, get_proxy, openssl_verify  # noqa: F401


def airlock(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    return subprocess.run(
        [sys.executable, "-m", "airlock", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_ca_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert airlock("init", "--data-dir", str(data)).returncode == 0
    r = airlock("ca", "init", "--data-dir", str(data), "--dn-base", "/DC=org/DC=example/O=Test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "issuing CA: /DC=org/DC=example/O=Test/CN=Airlock Issuing CA" in r.stdout
    ca_files = data / "keys" / "ca"
    for name in ("root.key", "issuing.key"):
        assert (ca_files / name).stat().st_mode & 0o777 == 0o600
    ca = load_ca(data / "keys", "/DC=org/DC=example/O=Test")
    assert slash_dn(ca.root.subject) == "/DC=org/DC=example/O=Test/CN=Airlock Root CA"
    assert ca.cert.issuer == ca.root.subject
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # The chain verifies with OpenSSL (issuing CA under the root).
    (tmp_path / "root.pem").write_bytes((ca_files / "root.pem").read_bytes())
    v = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(ca_files / "issuing.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert v.stdout.strip().endswith("OK"), v.stdout + v.stderr
    # Idempotent: a second init keeps the CA.
    before = (ca_files / "issuing.pem").read_bytes()
    r = airlock("ca", "init", "--data-dir", str(data))
    assert r.returncode == 0 and "already there" in r.stdout
    assert (ca_files / "issuing.pem").read_bytes() == before

    r = airlock("ca", "list", "--data-dir", str(data))
    assert r.returncode == 0 and r.stdout.strip() == ""
    r = airlock("ca", "show", "abc", "--data-dir", str(data))
    assert r.returncode == 1 and "no certificate with serial abc" in r.stdout
    r = airlock("ca", "revoke", "--data-dir", str(data))
    assert r.returncode == 1 and "needs a serial" in r.stdout
    r = airlock("ca", "init", "--data-dir", str(tmp_path / "other"), "--dn-base", "DC=org")
    assert r.returncode == 1 and "must look like /DC=org/DC=example" in r.stdout


def test_ca_list_show_revoke_on_issued_certificates(ca_api: Api, tmp_path: Path) -> None:
    v = ca_api.volunteer()
    reply, _ = get_proxy(ca_api, v, tmp_path / "p")
    eec = x509.load_pem_x509_certificate(reply["eec"].encode())
    serial = f"{eec.serial_number:x}"
    settings = ca_api.gw.settings
    common = ["--data-dir", str(settings.data_dir), "--database-url", settings.db_url]
    r = airlock("ca", "list", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert serial in r.stdout and reply["serial"] in r.stdout and "REVOKED" not in r.stdout
    r = airlock("ca", "show", serial, *common)
    assert r.returncode == 0 and '"type": "eec"' in r.stdout and f"CN={v.id}" in r.stdout
    r = airlock("ca", "revoke", serial, *common)
    assert r.returncode == 0, r.stdout + r.stderr
    crl = x509.load_pem_x509_crl(ca_api.client.get("/api/v1/ca/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(eec.serial_number) is not None
    r = airlock("ca", "crl", *common)
    assert r.returncode == 0 and "BEGIN X509 CRL" in r.stdout
    # The revoked EEC is not reused: the next proxy comes from a new one.
    again, _ = get_proxy(ca_api, v, tmp_path / "q")
    assert again["eec"] != reply["eec"]
    # As an X509_CERT_DIR (hashed certificates, signing policies, CRL): OpenSSL finds the CRL there.
    certdir = tmp_path / "certificates"
    r = airlock("ca", "export", str(certdir), *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(certdir.glob("*.signing_policy"))) == 2 and len(list(certdir.glob("*.r0"))) == 1
    policy = next(iter(certdir.glob("*.signing_policy"))).read_text()
    assert "pos_rights        globus        CA:sign" in policy
    for d, verdict in ((tmp_path / "p", "certificate revoked"), (tmp_path / "q", "OK")):
        check = subprocess.run(
            ["openssl", "verify", "-CApath", str(certdir), "-crl_check", str(d / "eec.pem")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert verdict in check.stdout + check.stderr, check.stdout + check.stderr
        proxy = subprocess.run(
            ["openssl", "verify", "-allow_proxy_certs", "-CApath", str(certdir), "-untrusted",
             str(d / "eec.pem"), str(d / "proxy.pem")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proxy.stdout.strip().endswith("OK"), proxy.stdout + proxy.stderr


def test_ca_certificate_and_crl_are_published(ca_api: Api, tmp_path: Path) -> None:
    chain = ca_api.client.get("/api/v1/ca/certificate")
    assert chain.status_code == 200 and chain.headers["content-type"].startswith("application/x-pem-file")
    certs = x509.load_pem_x509_certificates(chain.content)
    ca = load_ca(ca_api.gw.settings.keys_dir, DN)
    assert [c.subject for c in certs] == [ca.cert.subject, ca.root.subject]
    for der in (False, True):
        r = ca_api.client.get("/api/v1/ca/crl", params={"der": der})
        assert r.status_code == 200
        crl = x509.load_der_x509_crl(r.content) if der else x509.load_pem_x509_crl(r.content)
        assert crl.issuer == ca.cert.subject and len(crl) == 0
        assert crl.is_signature_valid(ca.key.public_key())  # signed by the issuing CA


def test_blocking_revokes_certificates_tokens_and_leases(ca_api: Api, tmp_path: Path) -> None:
    ca_api.submit(job("a"), job("b"))
    v = ca_api.volunteer()
    other = ca_api.volunteer()
    (task,) = v.work()
    reply, _ = get_proxy(ca_api, v, tmp_path / "v")
    get_proxy(ca_api, other, tmp_path / "o")
    eec = x509.load_pem_x509_certificate(reply["eec"].encode())

    def crl_check(d: Path) -> str:
        """The EEC against the CA's current CRL (OpenSSL checks CRLs of CA-issued certificates; a proxy
        falls with its EEC)."""
        (d / "crl.pem").write_bytes(ca_api.client.get("/api/v1/ca/crl").content)
        return openssl_verify(d, "-crl_check", "-CRLfile", str(d / "crl.pem"), proxy="eec.pem")

    assert crl_check(tmp_path / "v").strip().endswith("OK")
    assert ca_api.op("POST", f"/api/v1/volunteers/{v.id}/block").status_code == 200

    crl = x509.load_pem_x509_crl(ca_api.client.get("/api/v1/ca/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(eec.serial_number) is not None
    assert len(crl) == 1  # proxies are not the CA's to list; the other volunteer's EEC is untouched
    assert "certificate revoked" in crl_check(tmp_path / "v")
    assert crl_check(tmp_path / "o").strip().endswith("OK")
    # Its tokens are refused at once; no new proxy; its leased task is back in the queue.
    assert_error(v.request(), 403, "blocked")
    _, csr = new_request()
    assert_error(ca_api.client.post(URL, json={"csr": csr}, headers=v.auth), 403, "blocked")
    t = schema.tasks
    assert ca_api.count(t, t.c.id == task["task_id"], t.c.state == "lost") == 1
    assert {x["job_id"] for x in other.work(2)} >= {task["job_id"]}
    c = schema.credentials
    assert ca_api.count(c, c.c.volunteer_id == v.id, c.c.revoked.is_(False)) == 0
    # Unblocked, it gets a proxy from a NEW end-entity certificate (the old one stays revoked).
    assert ca_api.op("POST", f"/api/v1/volunteers/{v.id}/unblock").status_code == 200
    v.login()
    fresh, _ = get_proxy(ca_api, v, tmp_path / "w")
    assert fresh["eec"] != reply["eec"]
    assert crl_check(tmp_path / "w").strip().endswith("OK")
