"""BOINC code signing: the key pair, its text format, and file signatures the stock client accepts.

The client trusts the first `<code_sign_key>` a project sends and runs an app file only if its
`<file_signature>` verifies with that key (otherwise the task fails with -186). The formats, as the client
reads them (BOINC lib/crypt.cpp; measured against Debian's boinc-client 7.20.5, see
shared/notes/boinc-protocol.md):

- public key text: the modulus size in bits on the first line, then the hex of a 256-byte block (the
  modulus and the public exponent, each left-padded to 128 bytes, big-endian), 32 bytes per line, then a
  line holding a single `.`; at most 1024 bits;
- signature: the file's MD5 as 32 lowercase hex characters (the ASCII text, no DigestInfo), padded with
  PKCS#1 v1.5 type 1 and raised to the private exponent; 128 bytes as hex, 32 bytes per line, then `.`.

BOINC's practice, kept here: the private key lives offline, never on the host that serves files; the
gateway holds only the public key text and the signatures.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_BITS = 1024  # the client's key structure has a fixed 128-byte modulus field
_FIELD = 128
_LINE = 32  # bytes per hex line


class SignatureError(ValueError):
    pass


def generate_key(bits: int = KEY_BITS) -> rsa.RSAPrivateKey:
    if bits > KEY_BITS or bits < 512:
        raise ValueError(f"BOINC code-signing keys have 512 to {KEY_BITS} bits (asked for {bits})")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size > KEY_BITS:
        raise SignatureError(f"{path} is not a BOINC code-signing key (RSA of at most {KEY_BITS} bits)")
    return key


def _hex_lines(data: bytes) -> str:
    return "".join(data[i : i + _LINE].hex() + "\n" for i in range(0, len(data), _LINE)) + ".\n"


def _from_hex_lines(text: str, what: str) -> bytes:
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[-1] != ".":
        raise SignatureError(f"{what} does not end with a '.' line")
    try:
        return bytes.fromhex("".join(lines[:-1]))
    except ValueError as exc:
        raise SignatureError(f"{what} is not hex: {exc}") from exc


def public_key_text(key: rsa.RSAPublicKey) -> str:
    """The key as BOINC's `<code_sign_key>` text."""
    numbers = key.public_numbers()
    block = numbers.n.to_bytes(_FIELD, "big") + numbers.e.to_bytes(_FIELD, "big")
    return f"{key.key_size}\n" + _hex_lines(block)


def parse_public_key_text(text: str) -> rsa.RSAPublicKey:
    first, _, rest = text.strip().partition("\n")
    try:
        bits = int(first)
    except ValueError as exc:
        raise SignatureError("a BOINC public key starts with its size in bits") from exc
    block = _from_hex_lines(rest, "the public key")
    if len(block) != 2 * _FIELD:
        raise SignatureError(f"the public key block is {len(block)} bytes, not {2 * _FIELD}")
    n, e = int.from_bytes(block[:_FIELD], "big"), int.from_bytes(block[_FIELD:], "big")
    if n.bit_length() != bits:
        raise SignatureError(f"the modulus has {n.bit_length()} bits, the header says {bits}")
    return rsa.RSAPublicNumbers(e, n).public_key()


def file_md5_hex(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # BOINC's choice of digest, kept for compatibility
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _modulus_bytes(n: int) -> int:
    return (n.bit_length() + 7) // 8


def sign_file(key: rsa.RSAPrivateKey, path: Path) -> str:
    """The `<file_signature>` text of `path`."""
    message = file_md5_hex(path).encode("ascii")
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    k = _modulus_bytes(n)
    padded = b"\x00\x01" + b"\xff" * (k - 3 - len(message)) + b"\x00" + message  # PKCS#1 v1.5 type 1
    signature = pow(int.from_bytes(padded, "big"), d, n).to_bytes(_FIELD, "big")
    return _hex_lines(signature)


def verify_file(public: rsa.RSAPublicKey, path: Path, signature_text: str) -> bool:
    """What the client checks: the signature opens, with the public key, to the file's MD5 hex."""
    try:
        raw = _from_hex_lines(signature_text, "the signature")
    except SignatureError:
        return False
    numbers = public.public_numbers()
    k = _modulus_bytes(numbers.n)
    value = int.from_bytes(raw, "big")
    if len(raw) != _FIELD or value >= numbers.n:
        return False
    opened = pow(value, numbers.e, numbers.n).to_bytes(k, "big")
    if not opened.startswith(b"\x00\x01") or b"\x00" not in opened[2:]:
        return False
    padding, message = opened[2:].split(b"\x00", 1)
    return len(padding) >= 8 and set(padding) == {0xFF} and message == file_md5_hex(path).encode("ascii")
