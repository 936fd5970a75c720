"""The agent's HTTP client: every call the volunteer side makes, with retries.

Connection errors, timeouts, 429 and 5xx answers are retried forever with capped exponential backoff and
jitter (the agent carries on when the server comes back); 4xx answers are not retried, and the server's
`message` is logged. A 401 with error code "unauthorized" (an expired access token) makes the client log in
again once and repeat the call; a 403 on a volunteer call means the volunteer is blocked.

Secrets: the password and the access token live only in this object, never on disk or in a payload's
environment. Uploads carry the task's own `upload_token` instead of the access token.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from airlock.core.checksums import CHUNK, Digest, StreamingDigest, format_digest_header
from airlock.core.schemas import (
    ErrorBody,
    HeartbeatReply,
    HostRegistered,
    HostRegistration,
    InputRef,
    Login,
    ReportAccepted,
    TaskReport,
    TokenResponse,
    WorkReply,
    WorkRequest,
)

log = logging.getLogger(__name__)
MAX_REDIRECTS = 3


class ApiError(Exception):
    """A 4xx answer (not retried)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Blocked(ApiError):
    """403 on a volunteer call: the volunteer is blocked (or the token refused). The agent must stop."""


class LoginFailed(ApiError):
    """The server refused the user name and password."""


class LeaseGone(ApiError):
    """409/410 on a heartbeat: the task's lease is gone (expired, reassigned, job cancelled)."""


class Cancelled(Exception):
    """A retry loop was interrupted because the call is no longer wanted (task aborted, agent stopping)."""


class InputMismatch(Exception):
    """A downloaded input does not have the size or checksums its assignment declared."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: initial * 2**attempt, capped, then scaled by a random factor in [0.5, 1]."""

    initial_s: float = 1.0
    cap_s: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.cap_s, self.initial_s * (2 ** min(attempt, 32)))
        return float(base * (rng or random).uniform(0.5, 1.0))


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = ErrorBody.model_validate_json(response.content)
        return body.error, body.message
    except ValueError:
        text = response.text[:300] if response.content else ""
        return f"http_{response.status_code}", text or response.reason_phrase


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class ServerClient:
    """Talks to one Airlock server as one volunteer. Thread-safe: the task threads share it."""

    def __init__(
        self,
        server: str,
        user: str,
        password: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        sleep: Callable[[float, threading.Event | None], bool] | None = None,
        stop: threading.Event | None = None,
        token_file: Path | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.user = user
        self._password = password
        # A given access token (a BOINC pilot's, from the project-specific preferences) instead of a
        # login: re-read from the file when refused, as the pilot's wrapper keeps it fresh.
        self._token_file = token_file
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self.backoff = backoff or Backoff()
        self._sleep = sleep or _interruptible_sleep
        self.stop = stop or threading.Event()
        self.http = httpx.Client(
            base_url=self.server,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={"User-Agent": "airlock-agent/0.1"},
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:  # never show secrets
        return f"ServerClient({self.server!r}, user={self.user!r})"

    # ------------------------------------------------------------------------------------- plumbing

    def _wait(self, attempt: int, why: str, cancel: threading.Event | None) -> None:
        delay = self.backoff.delay(attempt)
        log.warning("%s; retrying in %.1f s", why, delay)
        for event in (cancel, self.stop):
            if event is not None and event.is_set():
                raise Cancelled(why)
        if self._sleep(delay, cancel or self.stop) or self.stop.is_set():
            raise Cancelled(why)

    def _send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        auth: str = "access",
        headers: dict[str, str] | None = None,
        content: Callable[[], Iterator[bytes]] | None = None,
        cancel: threading.Event | None = None,
        stream_to: Callable[[httpx.Response], None] | None = None,
        on_transport_error: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """Send with retries. `auth` is "access" (the volunteer's token), "none", or an upload token
        prefixed "upload:". `content` makes a fresh body iterator per attempt. If `stream_to` is given,
        a 2xx body is streamed to it (a connection error mid-body retries the whole request)."""
        attempt = 0
        relogged = False
        while True:
            hdrs = dict(headers or {})
            sent_token: str | None = None
            if auth == "access":
                sent_token = self._access_token(cancel)
                hdrs["Authorization"] = f"Bearer {sent_token}"
            elif auth.startswith("upload:"):
                hdrs["Authorization"] = f"Bearer {auth[len('upload:') :]}"
            try:
                request = self.http.build_request(
                    method, url, json=json, headers=hdrs, content=content() if content else None
                )
                response = self.http.send(request, stream=True)
                try:
                    if stream_to is not None and response.is_success:
                        stream_to(response)
                    else:
                        response.read()
                finally:
                    response.close()
            except httpx.TransportError as exc:
                if on_transport_error is not None:
                    on_transport_error()
                self._wait(attempt, f"{method} {url}: {type(exc).__name__}: {exc}", cancel)
                attempt += 1
                continue
            status = response.status_code
            if _retryable(status):
                code, message = _error_of(response)
                self._wait(attempt, f"{method} {url}: server answered {status} ({message})", cancel)
                attempt += 1
                continue
            if status == 401 and auth == "access" and not relogged:
                code, message = _error_of(response)
                if code == "unauthorized":
                    log.info("access token refused (%s); logging in again", message)
                    self._relogin(sent_token, cancel)
                    relogged = True
                    continue
            return response

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        if response.is_success:
            return
        code, message = _error_of(response)
        log.error("%s refused: HTTP %d %s: %s", what, response.status_code, code, message)
        if response.status_code == 403:
            raise Blocked(response.status_code, code, message)
        raise ApiError(response.status_code, code, message)

    # ---------------------------------------------------------------------------------------- auth

    def _access_token(self, cancel: threading.Event | None) -> str:
        with self._token_lock:
            if self._token is None:
                self._token = self._login(cancel)
            return self._token

    def _relogin(self, refused: str | None, cancel: threading.Event | None) -> None:
        with self._token_lock:
            if self._token == refused or self._token is None:  # another thread may have done it already
                self._token = self._login(cancel)

    def login(self) -> None:
        """Log in now (the first call would otherwise do it): fails early on a wrong password."""
        with self._token_lock:
            self._token = self._login(None)

    def _login(self, cancel: threading.Event | None) -> str:
        if self._token_file is not None:
            try:
                fresh = self._token_file.read_text().strip()
            except OSError as exc:
                raise LoginFailed(401, "no_token", f"cannot read {self._token_file}: {exc}") from None
            if not fresh or fresh == self._token:
                raise LoginFailed(401, "token_expired", "the access token was refused and no fresh one came")
            return fresh
        body = Login(username=self.user, password=self._password).model_dump()
        response = self._send("POST", "/api/v1/auth/token", json=body, auth="none", cancel=cancel)
        if response.status_code == 403:
            code, message = _error_of(response)
            raise Blocked(403, code, message)
        if response.status_code in (400, 401, 404, 422):
            code, message = _error_of(response)
            raise LoginFailed(response.status_code, code, message)
        self._raise_for(response, "login")
        token = TokenResponse.model_validate_json(response.content)
        log.info("logged in to %s as %s (token valid %d s)", self.server, self.user, token.expires_in)
        return token.access_token

    # ------------------------------------------------------------------------------- volunteer calls

    def register_host(self, registration: HostRegistration) -> HostRegistered:
        r = self._send("POST", "/api/v1/hosts", json=registration.model_dump(mode="json"))
        self._raise_for(r, "host registration")
        return HostRegistered.model_validate_json(r.content)

    def request_work(self, request: WorkRequest) -> WorkReply:
        r = self._send("POST", "/api/v1/work", json=request.model_dump(mode="json"))
        self._raise_for(r, "work request")
        return WorkReply.model_validate_json(r.content)

    def heartbeat(self, task_id: int, host_id: int, cancel: threading.Event | None = None) -> HeartbeatReply:
        """Extend a task's lease. Raises LeaseGone on 409/410."""
        r = self._send("POST", f"/api/v1/tasks/{task_id}/heartbeat", json={"host_id": host_id}, cancel=cancel)
        if r.status_code in (409, 410):
            code, message = _error_of(r)
            raise LeaseGone(r.status_code, code, message)
        self._raise_for(r, f"heartbeat of task {task_id}")
        return HeartbeatReply.model_validate_json(r.content)

    def report(self, task_id: int, report: TaskReport, cancel: threading.Event | None = None) -> str:
        """Report a finished task; returns the task's new state ("already reported" counts as done)."""
        r = self._send(
            "POST", f"/api/v1/tasks/{task_id}/report", json=report.model_dump(mode="json"), cancel=cancel
        )
        if r.status_code == 409:
            code, message = _error_of(r)
            if "already" in message.lower() or "already" in code:
                log.info("task %d: already reported (%s)", task_id, message)
                return "reported"
        self._raise_for(r, f"report of task {task_id}")
        return ReportAccepted.model_validate_json(r.content).state

    def download(self, ref: InputRef, dest: Path, cancel: threading.Event | None = None) -> Digest:
        """Stream an input to `dest` (never whole in memory) and verify its size, adler32 and sha256."""
        got: list[Digest] = []

        def sink(response: httpx.Response) -> None:
            digest = StreamingDigest()
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    fh.write(chunk)
                    if digest.size > ref.size:
                        break  # the rest cannot make it right
            got.append(digest.digest())

        r = self._send("GET", ref.url, cancel=cancel, stream_to=sink)
        self._raise_for(r, f"download of input {ref.name}")
        d = got[-1]
        expected = (ref.size, ref.adler32.lower(), ref.sha256.lower())
        if (d.size, d.adler32, d.sha256) != expected:
            raise InputMismatch(
                f"input {ref.name}: got size={d.size} adler32={d.adler32} sha256={d.sha256}, "
                f"expected size={ref.size} adler32={ref.adler32} sha256={ref.sha256}"
            )
        return d

    def upload(
        self,
        url: str,
        path: Path,
        upload_token: str,
        declared: Digest,
        cancel: threading.Event | None = None,
    ) -> UploadResult:
        """PUT a file to the data bridge or storage endpoint, streaming it, with its declared `Digest`.

        Connection errors are retried. A 307/308 redirect (dCache and EOS send the client from the door
        to a data server) is followed for up to MAX_REDIRECTS hops to an http(s) URL, with the body sent
        again. Storage that refuses to overwrite answers a retry with 403/409 when the first attempt did
        land and only its reply was lost: such a refusal after a connection error is reported as
        `maybe_landed`, so the agent still reports the output and the validator, which reads the
        storage's own checksums, decides (an accepted result is never dropped for a lost reply)."""
        size = path.stat().st_size
        broken = 0

        def body() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        def count_broken() -> None:
            nonlocal broken
            broken += 1

        headers = {
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
            "Digest": format_digest_header(declared.adler32, declared.sha256),
        }
        target = url
        for _hop in range(MAX_REDIRECTS + 1):
            response = self._send(
                "PUT",
                target,
                auth=f"upload:{upload_token}",
                headers=headers,
                content=body,
                cancel=cancel,
                on_transport_error=count_broken,
            )
            location = response.headers.get("Location")
            if response.status_code not in (307, 308) or not location:
                break
            target = str(response.request.url.join(location))
            if not target.startswith(("https://", "http://")):
                return UploadResult(response.status_code, f"redirect to {target!r} refused", False)
            log.info("upload of %s redirected to %s", path.name, target)
        else:
            return UploadResult(response.status_code, f"more than {MAX_REDIRECTS} redirects", False)
        status = response.status_code
        message = _error_of(response)[1] if not response.is_success else ""
        maybe_landed = status in (403, 409) and broken > 0
        if maybe_landed:
            log.warning(
                "upload of %s: the retry was refused (HTTP %d %s) after a lost reply; the first attempt "
                "probably landed, so the output is reported and left to the validator",
                path.name, status, message,
            )  # fmt: skip
        return UploadResult(status, message, maybe_landed)


@dataclass(frozen=True)
class UploadResult:
    """How an upload ended: the final HTTP status, the server's message on a refusal, and whether a
    refused retry may hide an earlier attempt that landed."""

    status_code: int
    message: str
    maybe_landed: bool = False

    @property
    def stored(self) -> bool:
        """The bytes are (or may well be) in storage: report the output."""
        return self.status_code in (200, 201) or self.maybe_landed


def _interruptible_sleep(seconds: float, cancel: threading.Event | None) -> bool:
    """Sleep; return True early if `cancel` is set."""
    if cancel is None:
        threading.Event().wait(seconds)
        return False
    return cancel.wait(seconds)
