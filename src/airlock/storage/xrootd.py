"""Storage on an XRootD (or dCache, EOS: any WLCG-token WebDAV) endpoint over HTTPS.

Volunteers upload straight to the server with their per-task `storage.create` token, so output bytes never
pass through the gateway. The gateway itself acts with its own token (`GatewayToken`): a trusted
credential that lives only in this process's memory, carries a separate audience (the gateway's API refuses
it; the storage accepts it) and is re-minted shortly before it expires. It never goes into anything sent to
a volunteer.

Writes are create-only and atomic: bytes go to a temporary name in the area's staging folder
(`trusted/.partial/`), are checked against the server's adler32, then MOVEd to their key only if the key
is still free. Checksums come from the server (HEAD with `Want-Digest: adler32`); sha256 needs the bytes,
so `stat()` and `download()` read the file.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, TypeVar
from urllib.parse import quote, unquote, urlsplit

import httpx
import jwt

from airlock.config import Settings
from airlock.core.checksums import CHUNK, Digest, StreamingDigest, digest_file
from airlock.core.errors import TooLarge
from airlock.credentials.tokens import ALGORITHM, WLCG_VERSION, TokenIssuer
from airlock.storage.base import (
    PARTIAL,
    STAGING,
    AlreadyExists,
    DeferredSyncs,
    DigestMismatch,
    StorageError,
    staging_key,
)

log = logging.getLogger("airlock.storage")
GATEWAY_SUBJECT = "airlock-gateway"
TOKEN_TTL_S = 1200
TOKEN_RENEW_BEFORE_S = 300
DAV = "{DAV:}"
IDEMPOTENT = frozenset({"HEAD", "GET", "PROPFIND", "DELETE"})
ATTEMPTS = 3  # for an idempotent request whose connection broke; PUT and MOVE are sent once
TIMEOUT_ATTEMPTS = 2  # when it timed out: the server is likely stalled, and each try costs a whole timeout
RETRY_PAUSE_S = 0.2
T = TypeVar("T")


def _try_again(exc: httpx.TransportError, attempt: int, attempts: int) -> bool:
    """Whether a request whose connection broke with `exc` on try `attempt` (from 0) is sent again."""
    limit = min(attempts, TIMEOUT_ATTEMPTS) if isinstance(exc, httpx.TimeoutException) else attempts
    return attempt + 1 < limit


class GatewayToken:
    """The gateway's own storage token: read, create, modify on its areas (never sent to a volunteer)."""

    def __init__(
        self, issuer: TokenIssuer, audience: str, areas: tuple[str, ...] = ("/quarantine", "/trusted")
    ) -> None:
        self._issuer, self.audience = issuer, audience
        self.scope = " ".join(f"storage.{op}:{a}" for a in areas for op in ("read", "create", "modify"))
        self._token, self._expires = "", 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            now = time.time()
            if now > self._expires - TOKEN_RENEW_BEFORE_S:
                key = self._issuer.current
                iat = int(now)
                self._expires = iat + TOKEN_TTL_S
                claims = {
                    "wlcg.ver": WLCG_VERSION,
                    "iss": self._issuer.issuer,
                    "sub": GATEWAY_SUBJECT,
                    "aud": self.audience,
                    "scope": self.scope,
                    "iat": iat,
                    "nbf": iat,
                    "exp": int(self._expires),
                    "jti": uuid.uuid4().hex,
                }
                self._token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})
            return self._token


def parse_adler32(header: str | None) -> str | None:
    """`Digest: adler32=0a1b2c3d` (RFC 3230, possibly with other algorithms) -> '0a1b2c3d'."""
    for part in (header or "").split(","):
        algo, _, value = part.strip().partition("=")
        if algo.strip().lower() == "adler32" and value:
            return value.strip().lower().rjust(8, "0")
    return None


class PendingUpload:
    """Bytes received into a local spool file; `publish()` sends them to the server under their key."""

    blocking = True

    def __init__(self, storage: XRootDStorage, key: str, spool: Path, digest: Digest) -> None:
        self._storage, self._key, self._spool, self.digest = storage, key, spool, digest

    def publish(self, key: str | None = None) -> None:
        try:
            self._storage.put_new(key or self._key, self._spool, self.digest)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self._spool.parent, ignore_errors=True)


class XRootDStorage:
    """Keys map to `<base_url>/<key>`; every request carries the gateway's bearer token."""

    name = "xrootd"

    def __init__(
        self,
        base_url: str,
        token: GatewayToken,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._base_path = urlsplit(self.base_url).path.rstrip("/")
        # One request at a time over a kept-alive connection: XRootD 5.5.3's XrdHttp was seen to stop
        # answering (TLS handshakes time out) under concurrent connections from one client.
        self._io = threading.Lock()
        self._client = httpx.Client(
            verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
            timeout=timeout_s,
            follow_redirects=True,
        )

    # ------------------------------------------------------------------------------------------ helpers
    def url(self, key: str) -> str:
        pure = PurePosixPath(key)
        if pure.is_absolute() or any(part in {"", ".", ".."} for part in pure.parts) or not pure.parts:
            raise StorageError(f"invalid storage key {key!r}")
        return f"{self.base_url}/{quote(pure.as_posix())}"

    def _auth(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}", **(extra or {})}

    def _request(
        self,
        method: str,
        key: str,
        headers: dict[str, str] | None = None,
        content: Iterator[bytes] | None = None,
    ) -> httpx.Response:
        return self._send(method, self.url(key), key, headers, content)

    def _send(
        self,
        method: str,
        url: str,
        what: str,
        headers: dict[str, str] | None = None,
        content: Iterator[bytes] | None = None,
    ) -> httpx.Response:
        attempts = ATTEMPTS if method in IDEMPOTENT else 1
        with self._io:
            return self._retrying(
                f"{method} {what}",
                attempts,
                lambda: self._client.request(method, url, headers=self._auth(headers), content=content),
            )

    @staticmethod
    def _retrying(what: str, attempts: int, call: Callable[[], T]) -> T:
        """`call()`, sent again (up to `attempts` tries, see `_try_again`) when the connection broke before
        an answer: XrdHttp closed the kept-alive connection, left it unanswered, or failed its TLS record
        (`bad record mac`, seen under load). Only for requests that change nothing if done twice."""
        for attempt in range(attempts):
            try:
                return call()
            except httpx.TransportError as exc:
                if not _try_again(exc, attempt, attempts):
                    raise StorageError(f"{what}: {exc}") from exc
                log.warning("%s: %s; trying again on a new connection", what, exc)
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
            except httpx.HTTPError as exc:
                raise StorageError(f"{what}: {exc}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _fail(resp: httpx.Response, what: str) -> StorageError:
        return StorageError(f"{what}: HTTP {resp.status_code} {resp.text.strip()[:200]}")

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------- server checksums
    def checksum(self, key: str) -> tuple[int, str] | None:
        """(size, adler32) as the server computes them, None if there is no such file."""
        resp = self._request("HEAD", key, {"Want-Digest": "adler32"})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"HEAD {key}")
        adler = parse_adler32(resp.headers.get("digest"))
        if adler is None:
            raise StorageError(f"the server gave no adler32 for {key} (is `xrootd.chksum adler32` set?)")
        return int(resp.headers.get("content-length", "0")), adler

    def download(self, key: str, dest: Path) -> Digest:
        """Copy the file to `dest`, hashing it; the bytes must match the server's own adler32."""
        with self._io, dest.open("xb") as fh:

            def from_the_start() -> Digest:  # a try again rewrites the file
                d = StreamingDigest()
                fh.seek(0)
                fh.truncate()
                self._get_into(key, fh, d)
                return d.digest()

            got = self._retrying(f"GET {key}", ATTEMPTS, from_the_start)
        server = self.checksum(key)
        if server != (got.size, got.adler32):
            raise DigestMismatch(
                f"{key}: read {got.size} bytes adler32 {got.adler32}, the server says {server}"
            )
        return got

    def _get_into(self, key: str, fh: IO[bytes], d: StreamingDigest) -> None:
        with self._client.stream("GET", self.url(key), headers=self._auth()) as r:
            if r.status_code == 404:
                raise FileNotFoundError(key)
            if r.status_code != 200:
                r.read()
                raise self._fail(r, f"GET {key}")
            for chunk in r.iter_bytes(CHUNK):
                d.update(chunk)
                fh.write(chunk)

    # ------------------------------------------------------------------------------------------ writes
    def put_new(self, key: str, src: Path, expected: Digest) -> Digest:
        """Create `key` from a local file: temporary name, server adler32 check, MOVE into place.
        Idempotent: the same bytes already under `key` are fine; different ones raise AlreadyExists."""
        have = self.checksum(key)
        if have is not None:
            if have == (expected.size, expected.adler32):
                return expected
            raise AlreadyExists(f"{key} exists with different content")
        got = digest_file(src)
        if got != expected:
            raise DigestMismatch(f"{src} does not match its recorded checksums")
        tmp = staging_key(key)
        moved = False
        try:
            with src.open("rb") as fh:
                resp = self._request("PUT", tmp, {"Content-Length": str(got.size)}, _chunks(fh))
            if resp.status_code not in (200, 201, 204):
                raise self._fail(resp, f"PUT {tmp}")
            if self.checksum(tmp) != (got.size, got.adler32):
                raise DigestMismatch(f"{key}: the server's copy differs from what was sent")
            taken = self.checksum(key)  # by another writer of the same key meanwhile?
            if taken is not None:
                if taken == (got.size, got.adler32):
                    return got
                raise AlreadyExists(f"{key} exists with different content")
            resp = self._request("MOVE", tmp, {"Destination": self.url(key), "Overwrite": "F"})
            if resp.status_code not in (200, 201, 204):
                raise self._fail(resp, f"MOVE {tmp} -> {key}")
            moved = True
            return got
        finally:
            if not moved:
                self._request("DELETE", tmp)

    async def receive(self, key: str, chunks: AsyncIterator[bytes], *, max_size: int) -> PendingUpload:
        self.url(key)  # validate the key before taking any bytes
        spool = Path(tempfile.mkdtemp(prefix="airlock-upload-")) / "body"
        d = StreamingDigest()
        try:
            with spool.open("xb") as fh:
                async for chunk in chunks:
                    if d.size + len(chunk) > max_size:
                        raise TooLarge(f"upload exceeds the declared maximum of {max_size} bytes")
                    d.update(chunk)
                    fh.write(chunk)
        except BaseException:
            shutil.rmtree(spool.parent, ignore_errors=True)
            raise
        return PendingUpload(self, key, spool, d.digest())

    def copy_in(self, key: str, src: Path, expected: Digest, *, syncs: DeferredSyncs | None = None) -> Digest:
        return self.put_new(key, src, expected)  # durable once the server has answered: nothing to defer

    def copy_from(self, source: XRootDStorage, src_key: str, key: str, expected: Digest) -> Digest:
        """Copy a file of `source` (maybe this same server) to `key`, verified against `expected`.
        Idempotent like `copy_in`; a source that no longer matches raises DigestMismatch, a missing one
        FileNotFoundError (unless `key` already holds the expected bytes)."""
        have = self.checksum(key)
        if have is not None:
            if have == (expected.size, expected.adler32):
                return expected
            raise AlreadyExists(f"{key} exists with different content")
        with tempfile.TemporaryDirectory(prefix="airlock-copy-") as tmp:
            local = Path(tmp) / "data"
            got = source.download(src_key, local)
            if got != expected:
                raise DigestMismatch(f"{src_key} no longer matches its recorded checksums")
            return self.put_new(key, local, expected)

    # ------------------------------------------------------------------------------------------- reads
    def stat(self, key: str) -> Digest | None:
        """Full digest; sha256 is not kept by the server, so this reads the file."""
        with tempfile.TemporaryDirectory(prefix="airlock-stat-") as tmp:
            try:
                return self.download(key, Path(tmp) / "data")
            except FileNotFoundError:
                return None

    def exists(self, key: str) -> bool:
        return self.checksum(key) is not None

    def open_read(self, key: str) -> BinaryIO:
        """A local copy checked against the server's adler32; its name is gone once this returns (POSIX
        keeps the open file), so nothing is left behind when it is closed."""
        tmp = tempfile.mkdtemp(prefix="airlock-read-")
        try:
            path = Path(tmp) / "data"
            self.download(key, path)
            return path.open("rb")  # the caller closes it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        return None

    def delete(self, key: str) -> bool:
        resp = self._request("DELETE", key)
        if resp.status_code == 404:
            return False
        if resp.status_code not in (200, 204):
            raise self._fail(resp, f"DELETE {key}")
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Files under `prefix` (WebDAV PROPFIND, one level at a time), temporaries left out."""
        for key, _modified in self._walk(prefix):
            if PARTIAL not in key.rsplit("/", 1)[-1]:
                yield key

    def sweep_partials(self, area: str, older_than_s: float) -> int:
        """Delete temporaries of writes to `area` that died half-way (the gateway killed between PUT and
        MOVE, a dropped connection), once older than `older_than_s` by the server's clock of last change.
        One PROPFIND of the area's staging folder, however many files the area holds."""
        cutoff = time.time() - older_than_s
        stale = [
            key
            for key, modified in self._walk(f"{area.strip('/')}/{STAGING}", recurse=False)
            if PARTIAL in key.rsplit("/", 1)[-1] and modified is not None and modified < cutoff
        ]
        return sum(1 for key in stale if self.delete(key))

    def _walk(self, prefix: str, *, recurse: bool = True) -> Iterator[tuple[str, float | None]]:
        """Every file under `prefix` (or only in it) with its last-modified time (epoch seconds) when the
        server gives it. The staging folder is never walked into."""
        pending = [prefix.strip("/")]
        while pending:
            folder = pending.pop()
            resp = self._request("PROPFIND", folder, {"Depth": "1"}) if folder else self._root_propfind()
            if resp.status_code == 404:
                continue
            if resp.status_code != 207:
                raise self._fail(resp, f"PROPFIND {folder}")
            # the server is our authenticated trusted storage; ElementTree resolves no external entities
            for entry in ET.fromstring(resp.content).iter(f"{DAV}response"):
                href = unquote(entry.findtext(f"{DAV}href", "")).rstrip("/")
                key = href.removeprefix(self._base_path).strip("/")
                if not key or key == folder:
                    continue
                if entry.find(f".//{DAV}collection") is not None:
                    if recurse and key.rsplit("/", 1)[-1] != STAGING:
                        pending.append(key)
                else:
                    yield key, _http_date(entry.findtext(f".//{DAV}getlastmodified"))

    def _root_propfind(self) -> httpx.Response:
        return self._send("PROPFIND", self.base_url + "/", "/", {"Depth": "1"})


def open_xrootd(settings: Settings, issuer: TokenIssuer) -> XRootDStorage:
    """The configured endpoint (`bridge = "xrootd"`), acting with the gateway's own storage token."""
    if not settings.storage_url:
        raise ValueError("bridge = 'xrootd' needs storage_url")
    audience = settings.storage_audience or settings.storage_url.rstrip("/")
    return XRootDStorage(
        settings.storage_url, GatewayToken(issuer, audience), ca_file=settings.storage_ca_file
    )


def _http_date(text: str | None) -> float | None:
    """An RFC 1123 date (WebDAV getlastmodified) as epoch seconds; None if absent or unreadable."""
    if not text:
        return None
    try:
        return parsedate_to_datetime(text.strip()).timestamp()
    except (TypeError, ValueError):
        return None


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk
