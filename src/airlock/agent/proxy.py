"""The volunteer side of VCCS: make a key here, send only a CSR, write the usual grid proxy file
(proxy certificate, proxy key, end-entity certificate; mode 0600) and renew it before it expires.

The private key is generated on this machine and written only into the proxy file."""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("airlock.agent.proxy")
KEY_BITS = 2048
RENEW_FRACTION = 0.25  # renew when less than this share of the lifetime is left


@dataclass(frozen=True)
class Proxy:
    file: Path
    subject: str
    identity: str
    not_after: datetime
    ca_chain: str


def new_request() -> tuple[rsa.RSAPrivateKey, str]:
    """A fresh key and a CSR for it with an empty subject (the gateway fills in the DN)."""
    key = rsa.generate_private_key(65537, KEY_BITS)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def fetch_proxy(
    http: httpx.Client, headers: dict[str, str], path: Path, lifetime_s: int | None = None
) -> Proxy:
    """Ask the gateway for a proxy for a new local key and write the proxy file at `path`."""
    key, csr = new_request()
    body: dict[str, object] = {"csr": csr}
    if lifetime_s is not None:
        body["lifetime_s"] = lifetime_s
    r = http.post("/api/v1/credentials/x509", json=body, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"proxy request refused ({r.status_code}): {r.text}")
    reply = r.json()
    write_proxy_file(path, reply["proxy"], key, reply["eec"])
    if "ca_chain" in reply:
        (path.parent / (path.name + ".ca.pem")).write_text(reply["ca_chain"])
    return Proxy(
        path,
        reply["subject"],
        reply["identity"],
        datetime.fromisoformat(reply["not_after"]),
        reply["ca_chain"],
    )


def write_proxy_file(path: Path, proxy_pem: str, key: rsa.RSAPrivateKey, eec_pem: str) -> None:
    """Proxy certificate, its key (unencrypted, as grid tools expect) and the EEC; atomically, mode 0600."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".proxy-")  # created 0600
    with os.fdopen(fd, "w") as fh:
        fh.write(proxy_pem + key_pem + eec_pem)
    os.replace(tmp, path)


def remaining(path: Path, now: datetime | None = None) -> timedelta | None:
    """How long the proxy at `path` is still valid, None if there is none."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return cert.not_valid_after_utc - (now or datetime.now(UTC))


def needs_renewal(path: Path, lifetime: timedelta, now: datetime | None = None) -> bool:
    left = remaining(path, now)
    return left is None or left < lifetime * RENEW_FRACTION


class ProxyKeeper:
    """Keeps a valid proxy at `path` while the agent runs: fetches one now, renews it in the background."""

    def __init__(
        self, http: httpx.Client, headers: dict[str, str], path: Path, lifetime_s: int, stop: threading.Event
    ) -> None:
        self.http, self.headers, self.path = http, headers, path
        self.lifetime = timedelta(seconds=lifetime_s)
        self.stop = stop
        self.thread: threading.Thread | None = None

    def ensure(self) -> None:
        if needs_renewal(self.path, self.lifetime):
            proxy = fetch_proxy(self.http, self.headers, self.path, int(self.lifetime.total_seconds()))
            log.info(
                "proxy for %s written to %s (valid until %s)", proxy.identity, self.path, proxy.not_after
            )

    def start(self) -> None:
        self.ensure()
        self.thread = threading.Thread(target=self._run, name="proxy-renewal", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(max(self.lifetime.total_seconds() * RENEW_FRACTION / 4, 1.0)):
            try:
                self.ensure()
            except (httpx.HTTPError, RuntimeError) as exc:
                log.warning("proxy renewal failed (will retry): %s", exc)
