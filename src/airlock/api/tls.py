"""HTTPS with optional X.509 client authentication (proxies allowed) on uvicorn.

uvicorn verifies nothing beyond what the SSLContext does and does not put the client's chain into the
ASGI scope, so: the context accepts RFC 3820 proxies (VERIFY_ALLOW_PROXY_CERTS) chained to our CA, and
a protocol subclass adds the verified chain as the ASGI TLS extension (`client_cert_chain`, PEM)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from airlock.config import Settings


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a bearer token still works without a certificate
        ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return ctx


class ContextFactory:
    """uvicorn's `ssl_context_factory` (picklable, for worker processes)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.args = (cert_file, key_file, client_ca_file)

    def __call__(self, config: Any, default: Any) -> ssl.SSLContext:
        return server_context(*self.args)


class ClientCertProtocol(HttpToolsProtocol):
    """Adds the TLS extension with the client's verified certificate chain to every request's scope."""

    _chain: list[str] | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._chain is None:
            self._chain = _verified_chain(self.transport)
        if self._chain:
            self.scope["extensions"] = {"tls": {"client_cert_chain": self._chain}}


def _verified_chain(transport: Any) -> list[str]:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.getpeercert(binary_form=True) is None:
        return []
    # Python 3.13 has SSLObject.get_verified_chain(); 3.11 only the private _sslobj's.
    getter = getattr(ssl_object, "get_verified_chain", None) or ssl_object._sslobj.get_verified_chain
    return [cert.public_bytes() for cert in getter() or []]


def https_options(settings: Settings) -> dict[str, object]:
    """uvicorn options for HTTPS when `tls_cert_file` is set; client certificates are accepted when the
    gateway has a CA (chained to it, proxies allowed)."""
    if settings.tls_cert_file is None:
        return {}
    if settings.tls_key_file is None:
        raise ValueError("tls_cert_file needs tls_key_file")
    ca_dir = settings.keys_dir / "ca"
    client_ca: Path | None = None
    if (ca_dir / "issuing.pem").exists():
        client_ca = ca_dir / "client-ca.pem"
        client_ca.write_bytes((ca_dir / "issuing.pem").read_bytes() + (ca_dir / "root.pem").read_bytes())
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_context_factory": ContextFactory(settings.tls_cert_file, settings.tls_key_file, client_ca),
        "http": ClientCertProtocol,
    }
