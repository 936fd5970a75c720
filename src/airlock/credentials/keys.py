"""The gateway's token-signing keys (ES256), kept in the trusted domain with mode 0600."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        nums = self.public.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(nums.x.to_bytes(32, "big")),
            "y": _b64url(nums.y.to_bytes(32, "big")),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        }


def thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    """The key id: the RFC 7638 JWK thumbprint's first 64 bits in hex.

    Hex, not base64url: a base64url id begins with '-' once in 64 keys, and a command line then takes
    it for an option (`airlock keys retire -pfC...`)."""
    nums = public.public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(nums.x.to_bytes(32, "big")),
        "y": _b64url(nums.y.to_bytes(32, "big")),
    }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def generate_signing_key(keys_dir: Path) -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    kid = thumbprint(private.public_key())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(keys_dir / f"token-{kid}.pem", pem)
    return SigningKey(kid, private)


def load_signing_keys(keys_dir: Path) -> list[SigningKey]:
    """All keys, newest first (the newest signs; the others still verify tokens in flight)."""
    keys = []
    for path in sorted(keys_dir.glob("token-*.pem"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC key")
        keys.append(SigningKey(path.stem.removeprefix("token-"), private))
    return keys


def retire_signing_key(keys_dir: Path, kid: str) -> None:
    """Remove an old key (tokens it signed stop verifying). The current signing key cannot be retired."""
    keys = load_signing_keys(keys_dir)
    if kid not in {k.kid for k in keys}:
        raise ValueError(f"no signing key {kid!r}")
    if keys[0].kid == kid:
        raise ValueError(f"{kid} is the current signing key: rotate first")
    (keys_dir / f"token-{kid}.pem").unlink()
