"""The gateway's online CA: a root and an issuing CA, both kept in the trusted domain (keys mode 0600).

The root signs only the issuing CA; the issuing CA signs the volunteers' end-entity certificates and the
CRL. Files live in `<keys_dir>/ca/`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from airlock.core.errors import BadInput, NotFound
from airlock.credentials.keys import write_private

ROOT_LIFETIME = timedelta(days=3650)
ISSUING_LIFETIME = timedelta(days=1825)
CA_KEY_BITS = 3072
_DC = {
    "DC": NameOID.DOMAIN_COMPONENT,
    "C": NameOID.COUNTRY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
}


def ca_dir(keys_dir: Path) -> Path:
    return keys_dir / "ca"


def parse_dn(dn: str) -> list[x509.NameAttribute[str]]:
    """A DN in the grid's slash form (/DC=org/DC=example) as name attributes, first component first."""
    if not dn.startswith("/") or dn.endswith("/"):
        raise BadInput(f"DN {dn!r} must look like /DC=org/DC=example")
    attrs = []
    for part in dn[1:].split("/"):
        key, sep, value = part.partition("=")
        if not sep or not value or key not in _DC:
            raise BadInput(f"DN component {part!r} is not one of {sorted(_DC)}=<value>")
        attrs.append(x509.NameAttribute(_DC[key], value))
    return attrs


def name(dn: str, *extra: tuple[str, str]) -> x509.Name:
    attrs = parse_dn(dn) + [x509.NameAttribute(_DC[k], v) for k, v in extra]
    return x509.Name([x509.RelativeDistinguishedName([a]) for a in attrs])


def slash_dn(n: x509.Name) -> str:
    """The grid's `/DC=org/DC=example/CN=x` form of a name (as grid-proxy-info prints it)."""
    return "".join("/" + rdn.rfc4514_string() for rdn in n.rdns)


def new_serial() -> int:
    return secrets.randbits(127) | (1 << 126)  # positive, 127 bits, never zero


@dataclass(frozen=True)
class CA:
    root: x509.Certificate
    cert: x509.Certificate  # the issuing CA
    key: rsa.RSAPrivateKey
    dn_base: str

    def chain_pem(self) -> bytes:
        """Issuing CA then root: what a relying party needs to verify what we issue."""
        return self.cert.public_bytes(serialization.Encoding.PEM) + self.root.public_bytes(
            serialization.Encoding.PEM
        )


def _ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public: rsa.RSAPublicKey,
    signer: rsa.RSAPrivateKey,
    issuer_public: rsa.RSAPublicKey,
    now: datetime,
    lifetime: timedelta,
    path_length: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
        .sign(signer, hashes.SHA256())
    )


def init_ca(keys_dir: Path, dn_base: str, now: datetime) -> list[Path]:
    """Create the root and the issuing CA unless they exist (idempotent). Returns the files created."""
    d = ca_dir(keys_dir)
    if (d / "issuing.pem").exists():
        return []
    parse_dn(dn_base)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    root_key = rsa.generate_private_key(65537, CA_KEY_BITS)
    root_name = name(dn_base, ("CN", "Airlock Root CA"))
    root = _ca_cert(
        root_name, root_name, root_key.public_key(), root_key, root_key.public_key(), now, ROOT_LIFETIME, 1
    )
    key = rsa.generate_private_key(65537, CA_KEY_BITS)
    issuing = _ca_cert(
        name(dn_base, ("CN", "Airlock Issuing CA")),
        root_name,
        key.public_key(),
        root_key,
        root_key.public_key(),
        now,
        ISSUING_LIFETIME,
        0,
    )
    created = []
    for fname, data in (("root.key", _pkcs8(root_key)), ("issuing.key", _pkcs8(key))):
        write_private(d / fname, data)
        created.append(d / fname)
    for fname, cert in (("root.pem", root), ("issuing.pem", issuing)):
        (d / fname).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        created.append(d / fname)
    return created


def _pkcs8(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_ca(keys_dir: Path, dn_base: str) -> CA:
    d = ca_dir(keys_dir)
    if not (d / "issuing.pem").exists():
        raise NotFound("this gateway has no CA: run `airlock ca init`")
    key = serialization.load_pem_private_key((d / "issuing.key").read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the issuing CA key is not RSA")
    return CA(
        root=x509.load_pem_x509_certificate((d / "root.pem").read_bytes()),
        cert=x509.load_pem_x509_certificate((d / "issuing.pem").read_bytes()),
        key=key,
        dn_base=dn_base,
    )
