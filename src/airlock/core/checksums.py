"""Streaming checksums: adler32 (the grid's) and sha256, verified on every hop."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Digest:
    size: int
    adler32: str  # 8 lowercase hex digits, as xrdadler32 prints
    sha256: str  # 64 lowercase hex digits


class StreamingDigest:
    """Feed bytes as they arrive; never holds more than the chunk it is given."""

    __slots__ = ("_adler", "_sha", "size")

    def __init__(self) -> None:
        self._adler = 1
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._adler = zlib.adler32(chunk, self._adler)
        self._sha.update(chunk)
        self.size += len(chunk)

    def digest(self) -> Digest:
        return Digest(self.size, f"{self._adler & 0xFFFFFFFF:08x}", self._sha.hexdigest())


def digest_bytes(data: bytes) -> Digest:
    d = StreamingDigest()
    d.update(data)
    return d.digest()


def digest_chunks(chunks: Iterable[bytes]) -> Digest:
    d = StreamingDigest()
    for chunk in chunks:
        d.update(chunk)
    return d.digest()


def digest_stream(fh: BinaryIO) -> Digest:
    """The checksums of what is left to read from `fh`."""
    d = StreamingDigest()
    while chunk := fh.read(CHUNK):
        d.update(chunk)
    return d.digest()


def digest_file(path: Path) -> Digest:
    with path.open("rb") as fh:
        return digest_stream(fh)


def sha256_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def b64_to_sha256(b64: str) -> str:
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 32:
        raise ValueError("sha-256 digest must be 32 bytes")
    return raw.hex()


def format_digest_header(adler32: str, sha256: str) -> str:
    """RFC 3230 `Digest` header, the form XRootD and dCache answer with."""
    return f"adler32={adler32},sha-256={sha256_to_b64(sha256)}"


def parse_digest_header(value: str) -> dict[str, str]:
    """Parse `Digest: adler32=<hex>,sha-256=<base64>` into {'adler32': hex, 'sha256': hex}."""
    out: dict[str, str] = {}
    for part in value.split(","):
        algo, sep, val = part.strip().partition("=")
        if not sep:
            raise ValueError(f"malformed Digest entry {part.strip()!r}")
        algo = algo.strip().lower()
        val = val.strip()
        if algo == "adler32":
            if len(val) != 8 or any(c not in "0123456789abcdefABCDEF" for c in val):
                raise ValueError("adler32 must be 8 hex digits")
            out["adler32"] = val.lower()
        elif algo == "sha-256":
            out["sha256"] = b64_to_sha256(val)
    return out
