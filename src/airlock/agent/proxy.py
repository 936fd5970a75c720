"""The volunteer side of VCCS: make a key here, send only a CSR, write the usual grid proxy file
(proxy certificate, proxy key, end-entity certificate; mode 0600) and renew it before it expires.

The private key is generated on this machine and written only into the proxy file."""

from __future__ import annotations

import argparse
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

from airlock.agent.client import ApiError, Blocked

log = logging.getLogger("airlock.agent.proxy")
KEY_BITS = 2048
RENEW_FRACTION = 0.25  # renew when less than this share of the lifetime is left


@dataclass(frozen=True)
class Proxy:
    file: Path
    subject: str
    identity: str
    serial: str
    not_after: datetime
    ca_chain: str


def new_request() -> tuple[rsa.RSAPrivateKey, str]:
    """A fresh key and a CSR for it with an empty subject (the gateway fills in the DN)."""
    key = rsa.generate_private_key(65537, KEY_BITS)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proxy-file",
        type=Path,
        default=None,
        help="keep an X.509 proxy here (proxy, its key made locally, EEC; renewed while the agent runs)",
    )
    parser.add_argument(
        "--proxy-lifetime", type=int, default=12 * 3600, metavar="S", help="proxy lifetime asked for (s)"
    )


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
        try:
            error = r.json()
            code, message = str(error["error"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", r.text[:200]
        raise (Blocked if r.status_code == 403 else ApiError)(
            r.status_code, code, f"proxy refused: {message}"
        )
    reply = r.json()
    write_proxy_file(path, reply["proxy"], key, reply["eec"])
    if "ca_chain" in reply:
        (path.parent / (path.name + ".ca.pem")).write_text(reply["ca_chain"])
    return Proxy(
        path,
        reply["subject"],
        reply["identity"],
        reply["serial"],
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


def needs_renewal(path: Path, now: datetime | None = None) -> bool:
    """No proxy at `path`, or less than RENEW_FRACTION of its own lifetime left."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - (now or datetime.now(UTC)) < lifetime * RENEW_FRACTION


class ProxyKeeper:
    """Keeps a valid proxy at `path` while the agent runs: fetches one now, renews it in the background."""

    def __init__(
        self, http: httpx.Client, headers: dict[str, str], path: Path, lifetime_s: int, stop: threading.Event
    ) -> None:
        self.http, self.headers, self.path = http, headers, path
        self.lifetime = timedelta(seconds=lifetime_s)
        self.stop = stop
        self.thread: threading.Thread | None = None

    def ensure(self, now: datetime | None = None) -> None:
        if needs_renewal(self.path, now):
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
            except (httpx.HTTPError, ApiError) as exc:
                log.warning("proxy renewal failed (will retry): %s", exc)
