"""VCCS: short-lived X.509 credentials for volunteers, the volunteer's private key never travelling.

Design (as in the VCCS paper): the gateway holds, per volunteer, an end-entity certificate (EEC)
`<base>/OU=Volunteers/CN=<volunteer id>` and its key, both in the trusted domain. A volunteer sends a
certificate signing request for a key it generated itself; the gateway answers with an RFC 3820 proxy
certificate for that key, signed by the volunteer's EEC. The proxy's key is the volunteer's own and
never leaves its machine; the EEC key never leaves the gateway. The CA signs an EEC once per validity
window (cached on disk, mode 0600, shared by the server processes), not once per request.

Every EEC and every proxy is recorded as a Credential (kind "x509", serial in hex as jti); blocking a
volunteer marks them revoked, which puts the EECs on the CRL and makes the next request sign a new EEC
(after an unblock).
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import Connection, insert, select

from airlock.core.errors import BadInput, Forbidden
from airlock.credentials.ca import CA, ca_dir, name, new_serial, slash_dn
from airlock.db import schema

PROXY_CERT_INFO = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
# ProxyCertInfo { pCPathLenConstraint absent, proxyPolicy { id-ppl-inheritAll } } (RFC 3820), the
# same bytes `grid-proxy-init -rfc` writes.
PCI_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")
EEC_KEY_BITS = 2048
RSA_BITS = (2048, 8192)
EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
EEC_SCOPE = "x509.eec"
PROXY_SCOPE = "x509.proxy"
BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class EEC:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def serial_hex(self) -> str:
        return f"{self.cert.serial_number:x}"


@dataclass(frozen=True)
class IssuedProxy:
    proxy_pem: str
    eec_pem: str
    ca_chain_pem: str
    subject: str
    identity: str
    serial: str
    not_after: datetime


def volunteer_name(ca: CA, volunteer_id: int) -> x509.Name:
    return name(ca.dn_base, ("OU", "Volunteers"), ("CN", str(volunteer_id)))


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# ----------------------------------------------------------------------------------------- the CSR


def parse_csr(pem: str, expected: x509.Name) -> x509.CertificateSigningRequest:
    """A volunteer's request: well-formed, self-signed, an accepted key, no DN but its own, no extensions."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise BadInput(f"not a PEM certificate signing request: {exc}") from exc
    try:
        public = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise BadInput(f"the CSR's public key cannot be read: {exc}") from exc
    if isinstance(public, rsa.RSAPublicKey):
        if not RSA_BITS[0] <= public.key_size <= RSA_BITS[1]:
            raise BadInput(
                f"RSA key of {public.key_size} bits: the key must have {RSA_BITS[0]} to {RSA_BITS[1]} bits"
            )
    elif isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, EC_CURVES):
            raise BadInput(f"EC curve {public.curve.name} is not accepted (use secp256r1 or secp384r1)")
    else:
        raise BadInput(f"{type(public).__name__}: the key must be RSA (2048+ bits) or EC (P-256, P-384)")
    if not csr.is_signature_valid:
        raise BadInput("the CSR's signature does not match its key")
    if len(csr.subject) and csr.subject != expected:
        raise Forbidden(
            f"the CSR asks for {slash_dn(csr.subject)}; this login may only get {slash_dn(expected)} "
            "(or leave the subject empty)"
        )
    if len(csr.extensions):
        oids = ", ".join(e.oid.dotted_string for e in csr.extensions)
        raise BadInput(f"the CSR asks for extensions ({oids}); the gateway sets all extensions itself")
    return csr


# ------------------------------------------------------------------------------------------ issuance


class VCCS:
    def __init__(self, ca: CA, keys_dir: Path, eec_lifetime: timedelta, proxy_lifetime: timedelta) -> None:
        self.ca = ca
        self.eec_dir = ca_dir(keys_dir) / "eec"
        self.eec_lifetime = eec_lifetime
        self.proxy_lifetime = proxy_lifetime
        self._cache: dict[int, EEC] = {}
        self._lock = threading.Lock()

    def issue_proxy(
        self, conn: Connection, volunteer_id: int, csr_pem: str, now: datetime, lifetime: timedelta | None
    ) -> IssuedProxy:
        """Check the CSR, get (or sign) the volunteer's EEC, sign a proxy for the CSR's key and record it.
        The caller has checked the login and that the volunteer is active, in `conn`'s transaction."""
        expected = volunteer_name(self.ca, volunteer_id)
        csr = parse_csr(csr_pem, expected)
        want = min(lifetime or self.proxy_lifetime, self.proxy_lifetime)
        eec = self._eec(conn, volunteer_id, now, want)
        serial = new_serial()
        not_after = min(now + want, eec.cert.not_valid_after_utc)
        subject = x509.Name(
            [
                *eec.cert.subject.rdns,
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]),
            ]
        )
        proxy = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(eec.cert.subject)
            .public_key(csr.public_key())  # checked in parse_csr
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(_usage(), critical=True)
            .add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO, PCI_INHERIT_ALL), critical=True)
            .sign(eec.key, hashes.SHA256())
        )
        _record(conn, volunteer_id, f"{serial:x}", f"{PROXY_SCOPE} {slash_dn(subject)}", now, not_after)
        pem = serialization.Encoding.PEM
        return IssuedProxy(
            proxy_pem=proxy.public_bytes(pem).decode(),
            eec_pem=eec.cert.public_bytes(pem).decode(),
            ca_chain_pem=self.ca.chain_pem().decode(),
            subject=slash_dn(subject),
            identity=slash_dn(eec.cert.subject),
            serial=f"{serial:x}",
            not_after=not_after,
        )

    def _eec(self, conn: Connection, volunteer_id: int, now: datetime, need: timedelta) -> EEC:
        """The volunteer's current EEC if it is valid long enough and not revoked, else a new one."""
        with self._lock:
            eec = self._cache.get(volunteer_id) or self._load(volunteer_id)
        if eec is not None and eec.cert.not_valid_after_utc >= now + need and not _revoked(conn, eec):
            self._cache[volunteer_id] = eec
            return eec
        eec = self._sign_eec(volunteer_id, now)
        _record(
            conn,
            volunteer_id,
            eec.serial_hex,
            f"{EEC_SCOPE} {slash_dn(eec.cert.subject)}",
            now,
            eec.cert.not_valid_after_utc,
        )
        self._store(volunteer_id, eec)
        with self._lock:
            self._cache[volunteer_id] = eec
        return eec

    def _sign_eec(self, volunteer_id: int, now: datetime) -> EEC:
        key = rsa.generate_private_key(65537, EEC_KEY_BITS)
        cert = (
            x509.CertificateBuilder()
            .subject_name(volunteer_name(self.ca, volunteer_id))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(new_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + self.eec_lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca.key.public_key()), critical=False
            )
            .sign(self.ca.key, hashes.SHA256())
        )
        return EEC(cert, key)

    def _path(self, volunteer_id: int) -> Path:
        return self.eec_dir / f"{volunteer_id}.pem"

    def _load(self, volunteer_id: int) -> EEC | None:
        try:
            data = self._path(volunteer_id).read_bytes()
        except FileNotFoundError:
            return None
        cert = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            return None
        return EEC(cert, key)

    def _store(self, volunteer_id: int, eec: EEC) -> None:
        """Atomically, mode 0600: other server processes reuse it instead of signing their own."""
        self.eec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = eec.cert.public_bytes(serialization.Encoding.PEM) + eec.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd, tmp = tempfile.mkstemp(dir=self.eec_dir, prefix=".eec-")  # mkstemp creates it 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self._path(volunteer_id))


def _revoked(conn: Connection, eec: EEC) -> bool:
    c = schema.credentials
    row = conn.execute(select(c.c.revoked).where(c.c.jti == eec.serial_hex)).scalar_one_or_none()
    return row is None or bool(row)  # a certificate we have no record of is not reused


def _record(
    conn: Connection, volunteer_id: int, jti: str, scope: str, not_before: datetime, not_after: datetime
) -> None:
    conn.execute(
        insert(schema.credentials).values(
            jti=jti,
            kind="x509",
            volunteer_id=volunteer_id,
            scope=scope,
            not_before=not_before,
            not_after=not_after,
        )
    )
