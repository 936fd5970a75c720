"""The XRootD storage client when a connection breaks before the server answers (no server needed: the
failures are staged by an httpx.MockTransport). Seen on Debian's xrootd 5.5.3 under load: a kept-alive
connection closed, left unanswered, or a TLS record refused with `sslv3 alert bad record mac`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from airlock.core.checksums import digest_bytes
from airlock.credentials.keys import generate_signing_key
from airlock.credentials.tokens import TokenIssuer
from airlock.storage import xrootd
from airlock.storage.base import StorageError
from airlock.storage.xrootd import ATTEMPTS, TIMEOUT_ATTEMPTS, GatewayToken, XRootDStorage

BASE = "https://xrootd.test:1094/data"
DATA = b"validated bytes of a ROOT file"
BAD_MAC = "[SSL: SSLV3_ALERT_BAD_RECORD_MAC] sslv3 alert bad record mac (_ssl.c:2580)"


@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    return TokenIssuer("https://airlock.test", [generate_signing_key(tmp_path / "keys")])


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xrootd, "RETRY_PAUSE_S", 0.0)


def storage_with(
    issuer: TokenIssuer,
    answer: Callable[[httpx.Request], httpx.Response],
    broken: int,
    failure: type[httpx.TransportError] = httpx.ReadError,
) -> tuple[XRootDStorage, list[str]]:
    """A storage whose first `broken` requests die with `failure` (a TLS read error), the rest get
    `answer`."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        if len(sent) <= broken:
            raise failure(BAD_MAC if failure is httpx.ReadError else "timed out", request=request)
        return answer(request)

    storage = XRootDStorage(BASE, GatewayToken(issuer, "https://storage.airlock.test"))
    storage._client = httpx.Client(transport=httpx.MockTransport(handler))
    return storage, sent


def served(request: httpx.Request) -> httpx.Response:
    adler = digest_bytes(DATA).adler32
    if request.method == "HEAD":
        return httpx.Response(200, headers={"Digest": f"adler32={adler}", "Content-Length": str(len(DATA))})
    if request.method == "GET":
        return httpx.Response(200, content=DATA)
    return httpx.Response(500)


def test_a_read_whose_connection_broke_goes_again_and_gets_its_answer(issuer: TokenIssuer) -> None:
    storage, sent = storage_with(issuer, served, broken=ATTEMPTS - 1)
    assert storage.checksum("trusted/1/7/events.root") == (len(DATA), digest_bytes(DATA).adler32)
    assert sent == ["HEAD"] * ATTEMPTS


def test_a_read_that_keeps_breaking_is_a_storage_error_naming_the_file(issuer: TokenIssuer) -> None:
    storage, sent = storage_with(issuer, served, broken=ATTEMPTS)
    with pytest.raises(StorageError, match=r"HEAD trusted/1/7/events.root: .*bad record mac"):
        storage.checksum("trusted/1/7/events.root")
    assert sent == ["HEAD"] * ATTEMPTS  # bounded: no endless loop on a dead server


def test_a_download_goes_again_from_the_start_of_the_file(issuer: TokenIssuer, tmp_path: Path) -> None:
    storage, sent = storage_with(issuer, served, broken=1)
    assert storage.download("trusted/1/7/events.root", tmp_path / "copy") == digest_bytes(DATA)
    assert (tmp_path / "copy").read_bytes() == DATA  # no bytes of the broken try left in front
    assert sent == ["GET", "GET", "HEAD"]


def test_a_move_is_sent_once_even_when_its_connection_breaks(issuer: TokenIssuer, tmp_path: Path) -> None:
    """MOVE may have been done before the connection broke: sent again, it could answer 412 for our own
    file. It is not repeated; the next `put_new` of the key finds the bytes there and is done."""

    def second_move(request: httpx.Request) -> httpx.Response:
        raise AssertionError("a second MOVE was sent")

    storage, sent = storage_with(issuer, second_move, broken=1)
    with pytest.raises(StorageError, match="MOVE"):
        storage._request("MOVE", "trusted/.partial/x", {"Destination": storage.url("trusted/1/7/x")})
    assert sent == ["MOVE"]


def test_a_request_that_timed_out_goes_again_only_once(issuer: TokenIssuer, tmp_path: Path) -> None:
    """A server that let a request time out is likely stalled (XrdHttp was seen to stop answering for
    minutes): each further try would cost a whole timeout, so a timeout gets one more try, not two."""
    assert TIMEOUT_ATTEMPTS < ATTEMPTS
    storage, sent = storage_with(issuer, served, broken=ATTEMPTS, failure=httpx.ReadTimeout)
    with pytest.raises(StorageError, match="timed out"):
        storage.checksum("trusted/1/7/events.root")
    assert sent == ["HEAD"] * TIMEOUT_ATTEMPTS
    storage, sent = storage_with(issuer, served, broken=ATTEMPTS, failure=httpx.ConnectTimeout)
    with pytest.raises(StorageError, match="timed out"):
        storage.download("trusted/1/7/events.root", tmp_path / "copy")
    assert sent == ["GET"] * TIMEOUT_ATTEMPTS
    storage, sent = storage_with(issuer, served, broken=1, failure=httpx.ReadTimeout)
    assert storage.checksum("trusted/1/7/events.root") is not None  # one timeout, then an answer
