"""Unit tests of the agent that need no server: HTTP retries (httpx.MockTransport), faults, state, options,
and one task runner driven by a stub client."""

from __future__ import annotations

import argparse
import json
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.agent import faults
from airlock.agent import host as hostinfo
from airlock.agent.client import (
    ApiError,
    Backoff,
    Blocked,
    InputMismatch,
    LeaseGone,
    LoginFailed,
    ServerClient,
    UploadResult,
)
from airlock.agent.main import AgentOptions, add_agent_arguments, options_from_args
from airlock.agent.runner import Outcome, TaskContext, TaskRunner
from airlock.agent.sandbox import Sandbox
from airlock.core.checksums import Digest, digest_bytes, digest_file, parse_digest_header
from airlock.core.schemas import (
    HostRegistration,
    InputRef,
    OutputRef,
    Resources,
    TaskAssignment,
    TaskReport,
    WorkRequest,
)

TOKEN = {"access_token": "tok-1", "token_type": "bearer", "expires_in": 3600, "scope": "compute.read"}


def err(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "message": message, "detail": None})


class Recorder:
    """Records the sleeps a client asked for instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float, cancel: threading.Event | None) -> bool:
        self.delays.append(seconds)
        return False


def make_client(handler: Any, sleep: Recorder | None = None) -> ServerClient:
    return ServerClient(
        "http://airlock.test",
        "alice",
        "secret-password",
        transport=httpx.MockTransport(handler),
        sleep=sleep or Recorder(),
    )


# ------------------------------------------------------------------------------------------ retries


def test_backoff_grows_caps_and_jitters() -> None:
    b = Backoff(initial_s=1.0, cap_s=60.0)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(12)]
    for n, d in enumerate(delays):
        base = min(60.0, 2.0**n)
        assert base * 0.5 <= d <= base
    assert max(delays) <= 60.0
    assert len({round(d, 6) for d in delays[7:]}) > 1  # capped ones still jitter


def test_retries_5xx_and_connection_errors_then_succeeds() -> None:
    calls: list[str] = []
    script: list[str | int] = ["connect", 503, 500, "ok"]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json=TOKEN)
        step = script[len(calls)]
        calls.append(str(step))
        if step == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if step == "ok":
            return httpx.Response(200, json={"tasks": [], "retry_after_s": 30})
        return err(int(step), "unavailable", "database restarting")

    rec = Recorder()
    client = make_client(handler, rec)
    reply = client.request_work(WorkRequest(host_id=1, slots=1))
    assert reply.retry_after_s == 30
    assert calls == ["connect", "503", "500", "ok"]
    assert len(rec.delays) == 3
    assert 0.5 <= rec.delays[0] <= 1.0 and 1.0 <= rec.delays[1] <= 2.0 and 2.0 <= rec.delays[2] <= 4.0


def test_4xx_not_retried_and_message_logged(caplog: pytest.LogCaptureFixture) -> None:
    n = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal n
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json=TOKEN)
        n += 1
        return err(422, "bad_input", "slots must be positive")

    rec = Recorder()
    with pytest.raises(ApiError) as info:
        make_client(handler, rec).request_work(WorkRequest(host_id=1, slots=1))
    assert info.value.status == 422 and n == 1 and rec.delays == []
    assert "slots must be positive" in caplog.text


def test_expired_token_relogin() -> None:
    logins = 0
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal logins
        if request.url.path == "/api/v1/auth/token":
            assert json.loads(request.content) == {"username": "alice", "password": "secret-password"}
            logins += 1
            return httpx.Response(200, json={**TOKEN, "access_token": f"tok-{logins}"})
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] == "Bearer tok-1":
            return err(401, "unauthorized", "token expired")
        return httpx.Response(201, json={"host_id": 7, "daily_quota": 100})

    client = make_client(handler)
    got = client.register_host(HostRegistration(platform="x", cores=1, memory_mb=1, disk_mb=1))
    assert got.host_id == 7 and logins == 2
    assert seen == ["Bearer tok-1", "Bearer tok-2"]


def test_login_blocked_and_wrong_password() -> None:
    client = make_client(lambda r: err(403, "forbidden", "volunteer alice is blocked"))
    with pytest.raises(Blocked):
        client.login()
    client = make_client(lambda r: err(401, "unauthorized", "wrong user name or password"))
    with pytest.raises(LoginFailed):
        client.login()


def test_forbidden_on_work_means_blocked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json=TOKEN)
        return err(403, "forbidden", "blocked")

    with pytest.raises(Blocked):
        make_client(handler).request_work(WorkRequest(host_id=1))


def test_heartbeat_lease_gone_and_report_already_reported() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/auth/token":
            return httpx.Response(200, json=TOKEN)
        if path.endswith("/1/heartbeat"):
            return err(409, "conflict", "lease expired")
        if path.endswith("/2/heartbeat"):
            return err(410, "gone", "task gone")
        if path.endswith("/1/report"):
            return err(409, "conflict", "task 1 already reported")
        return err(409, "illegal_transition", "task is not leased to this host")

    client = make_client(handler)
    for tid in (1, 2):
        with pytest.raises(LeaseGone):
            client.heartbeat(tid, 5)
    report = TaskReport(host_id=5, exit_code=0)
    assert client.report(1, report) == "reported"
    with pytest.raises(ApiError):
        client.report(3, report)


def test_upload_streams_with_headers_and_retries_on_connection_error(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    digest = digest_file(path)
    attempts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        body = request.read()
        assert body == data
        if len(attempts) == 1:
            raise httpx.RemoteProtocolError("connection reset", request=request)
        return httpx.Response(200, json={"path": "/q", "size": len(data), **_digest_json(digest)})

    rec = Recorder()
    client = make_client(handler, rec)
    response = client.upload("http://bridge.test/quarantine/1/9/out.bin", path, "UPLOAD-TOKEN", digest)
    assert response.status_code == 200 and len(attempts) == 2 and len(rec.delays) == 1
    h = attempts[-1].headers
    assert h["Authorization"] == "Bearer UPLOAD-TOKEN"
    assert h["Content-Length"] == str(len(data))
    assert "transfer-encoding" not in h
    assert parse_digest_header(h["Digest"]) == {"adler32": digest.adler32, "sha256": digest.sha256}


def test_refused_retry_after_a_lost_reply_still_reports_the_output(tmp_path: Path) -> None:
    """Create-only storage (XRootD) answers the retry of a PUT that landed with 403: the output is
    reported anyway (the validator reads the storage's checksums); a plain 403 is a refusal."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"result" * 1000)
    digest = digest_file(path)
    stored: dict[str, bytes] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        key = request.url.path
        if key in stored:
            return httpx.Response(403, text="Unable to open file; permission denied")
        stored[key] = request.read()
        if key.endswith("lost-reply.bin"):
            raise httpx.ReadError("connection reset after the body was sent", request=request)
        return httpx.Response(201)

    client = make_client(handler)
    landed = client.upload("http://xrootd.test/q/1/9/lost-reply.bin", path, "TOKEN", digest)
    assert landed.status_code == 403 and landed.maybe_landed and landed.stored
    assert stored["/q/1/9/lost-reply.bin"] == path.read_bytes()
    first = client.upload("http://xrootd.test/q/1/9/plain.bin", path, "TOKEN", digest)
    assert first.stored and not first.maybe_landed
    again = client.upload("http://xrootd.test/q/1/9/plain.bin", path, "TOKEN", digest)
    assert again.status_code == 403 and not again.stored and "permission denied" in again.message


def test_upload_follows_storage_redirects_with_the_body(tmp_path: Path) -> None:
    """dCache and EOS redirect a PUT from the door to a data server (307/308)."""
    path = tmp_path / "out.bin"
    data = b"bytes for the pool" * 500
    path.write_bytes(data)
    digest = digest_file(path)
    seen: list[tuple[str, bytes, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen.append((str(request.url), body, request.headers["Authorization"]))
        if request.url.host == "door.test":
            return httpx.Response(307, headers={"Location": "https://pool.test:2880/q/1/9/out.bin?t=abc"})
        if request.url.host == "loop.test":
            return httpx.Response(308, headers={"Location": "/again"})
        if request.url.host == "odd.test":
            return httpx.Response(307, headers={"Location": "ftp://elsewhere/out.bin"})
        return httpx.Response(201)

    client = make_client(handler)
    result = client.upload("https://door.test/q/1/9/out.bin", path, "TOKEN", digest)
    assert result.status_code == 201 and result.stored
    assert [u for u, _, _ in seen] == [
        "https://door.test/q/1/9/out.bin",
        "https://pool.test:2880/q/1/9/out.bin?t=abc",
    ]
    assert all(body == data and auth == "Bearer TOKEN" for _, body, auth in seen)
    seen.clear()
    looped = client.upload("https://loop.test/out.bin", path, "TOKEN", digest)
    assert not looped.stored and "redirects" in looped.message and len(seen) == 4
    odd = client.upload("https://odd.test/out.bin", path, "TOKEN", digest)
    assert not odd.stored and "ftp://" in odd.message


def _digest_json(d: Digest) -> dict[str, str]:
    return {"adler32": d.adler32, "sha256": d.sha256}


def test_download_verifies_checksums(tmp_path: Path) -> None:
    payload = b"input data " * 1000
    d = digest_bytes(payload)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json=TOKEN)
        assert request.headers["Authorization"] == "Bearer tok-1"
        return httpx.Response(200, content=payload if "good" in request.url.path else payload[:-1] + b"X")

    client = make_client(handler)
    good = InputRef(name="in.dat", url="/api/v1/inputs/good", size=d.size, adler32=d.adler32, sha256=d.sha256)
    assert client.download(good, tmp_path / "in.dat") == d
    assert (tmp_path / "in.dat").read_bytes() == payload
    bad = good.model_copy(update={"url": "/api/v1/inputs/bad"})
    with pytest.raises(InputMismatch, match="sha256"):
        client.download(bad, tmp_path / "bad.dat")


# ------------------------------------------------------------------------------------------- faults


def test_behaviour_modes() -> None:
    assert faults.behaviour(None).exit_code(0) == 0
    assert faults.behaviour("fail").exit_code(0) == 3
    assert faults.behaviour("vanish").vanish_after_s is not None
    assert {faults.behaviour(m).name for m in faults.MODES} == set(faults.MODES)
    with pytest.raises(ValueError):
        faults.behaviour("explode")


def test_corrupt_declares_original_checksums(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_bytes(b"the right answer\n" * 10)
    real = digest_file(path)
    declared = faults.behaviour("corrupt").prepare_output(path, real)
    assert declared == real
    assert digest_file(path) != real and digest_file(path).size == real.size


def test_tamper_text_is_consistent(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("result 42\n")
    real = digest_file(path)
    declared = faults.behaviour("tamper").prepare_output(path, real)
    assert declared != real and declared == digest_file(path)


@pytest.mark.parametrize("kind", ["TTree", "ROOT::RNTuple"])
def test_tamper_root_stays_readable(tmp_path: Path, kind: str) -> None:
    np = pytest.importorskip("numpy")
    uproot = pytest.importorskip("uproot")
    path = tmp_path / "events.root"
    pt = np.linspace(1.0, 100.0, 50)
    events = {"event": np.arange(50, dtype=np.int64), "lb_pt": pt}
    info = {"seed": np.array([7], dtype=np.int64)}
    with uproot.recreate(path) as f:
        if kind == "TTree":
            f.mktree("events", {k: v.dtype for k, v in events.items()}).extend(events)
            f.mktree("info", {"seed": np.int64}).extend(info)
        else:
            f["events"] = events
            f["info"] = info
    real = digest_file(path)
    declared = faults.behaviour("tamper").prepare_output(path, real)
    assert declared == digest_file(path) != real
    with uproot.open(path) as f:
        assert f.classnames()["events;1"] == kind
        events = f["events"].arrays(library="np")
        assert np.array_equal(events["event"], np.arange(50))
        assert np.allclose(events["lb_pt"], pt * faults.TAMPER_SCALE)
        assert not np.array_equal(events["lb_pt"], pt)
        assert int(f["info"]["seed"].array(library="np")[0]) == 7


def test_extra_makes_undeclared_file(tmp_path: Path) -> None:
    (tmp_path / "5").mkdir()
    [(name, path)] = faults.behaviour("extra").extra_uploads(tmp_path / "5")
    assert name == "extra.bin" and path.exists() and path.parent == tmp_path


# ------------------------------------------------------------------------------- host, state, options


def test_state_file_keyed_by_server_and_user(tmp_path: Path) -> None:
    assert hostinfo.load_host_id(tmp_path, "http://a", "alice") is None
    hostinfo.save_host_id(tmp_path, "http://a/", "alice", 3)
    hostinfo.save_host_id(tmp_path, "http://b", "alice", 4)
    assert hostinfo.load_host_id(tmp_path, "http://a", "alice") == 3
    assert hostinfo.load_host_id(tmp_path, "http://b", "alice") == 4
    assert hostinfo.load_host_id(tmp_path, "http://a", "bob") is None
    assert (tmp_path / hostinfo.STATE_FILE).stat().st_mode & 0o077 == 0


def test_host_registration(tmp_path: Path) -> None:
    reg = hostinfo.registration(tmp_path)
    assert reg.cores >= 1 and reg.memory_mb > 16 and reg.disk_mb >= 1
    assert reg.platform.endswith("-linux-gnu")


def test_options_and_hidden_misbehave(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    assert "misbehave" not in parser.format_help()
    ns = parser.parse_args(
        [
            "--server",
            "http://s",
            "--user",
            "u",
            "--password",
            "pw",
            "--slots",
            "3",
            "--work-dir",
            str(tmp_path),
            "--once",
            "--misbehave",
            "tamper",
            "--poll-max",
            "5",
        ]
    )
    opts = options_from_args(ns)
    assert opts == AgentOptions(
        server="http://s", user="u", password="pw", slots=3, work_dir=tmp_path, once=True,
        misbehave="tamper", poll_max_s=5.0,
    )  # fmt: skip
    assert "pw" not in repr(opts)


# -------------------------------------------------------------------------- a task, with a stub client


class StubClient:
    """Stands in for ServerClient (no HTTP): serves inputs from memory, records uploads and reports."""

    def __init__(self, inputs: dict[str, bytes], upload_status: dict[str, int] | None = None) -> None:
        self.inputs = inputs
        self.upload_status = upload_status or {}
        self.uploads: dict[str, tuple[bytes, Digest]] = {}
        self.reports: list[TaskReport] = []
        self.heartbeats = 0
        self.abort_after: int | None = None
        self.upload_tokens: dict[str, str] = {}

    def download(self, ref: InputRef, dest: Path, cancel: threading.Event | None = None) -> Digest:
        data = self.inputs[ref.name]
        dest.write_bytes(data)
        d = digest_bytes(data)
        if (d.size, d.adler32, d.sha256) != (ref.size, ref.adler32, ref.sha256):
            raise InputMismatch(f"input {ref.name}: sha256 {d.sha256} != {ref.sha256}")
        return d

    def upload(
        self, url: str, path: Path, token: str, declared: Digest, cancel: threading.Event | None = None
    ) -> UploadResult:
        name = url.rsplit("/", 1)[1]
        self.uploads[name] = (path.read_bytes(), declared)
        self.upload_tokens[name] = token
        status = self.upload_status.get(name, 201)
        return UploadResult(status, "" if status < 300 else f"status {status}")

    def heartbeat(self, task_id: int, host_id: int, cancel: threading.Event | None = None) -> Any:
        from airlock.core.schemas import HeartbeatReply

        self.heartbeats += 1
        abort = self.abort_after is not None and self.heartbeats >= self.abort_after
        token = f"UPLOAD-{self.heartbeats}"  # upload tokens live minutes: each heartbeat renews it
        return HeartbeatReply(lease_expires_at=datetime.now(UTC), abort=abort, upload_token=token)

    def report(self, task_id: int, report: TaskReport, cancel: threading.Event | None = None) -> str:
        self.reports.append(report)
        return "reported"


def assignment(command: list[str], inputs: dict[str, bytes], outputs: list[str]) -> TaskAssignment:
    refs = []
    for name, data in inputs.items():
        d = digest_bytes(data)
        refs.append(
            InputRef(
                name=name, url=f"/api/v1/inputs/{d.sha256}", size=d.size, adler32=d.adler32, sha256=d.sha256
            )
        )
    return TaskAssignment(
        task_id=11,
        job_id=4,
        app=None,
        command=command,
        env={"GREETING": "hello"},
        inputs=refs,
        outputs=[
            OutputRef(name=n, max_size=1 << 20, upload_url=f"http://b/quarantine/1/11/{n}") for n in outputs
        ],
        resources=Resources(runtime_s=30),
        lease_expires_at=datetime.now(UTC) + timedelta(hours=1),
        deadline=datetime.now(UTC) + timedelta(days=1),
        heartbeat_interval_s=1,
        upload_token="UPLOAD",
    )


def run_task(
    tmp_path: Path, task: TaskAssignment, stub: StubClient, mode: str | None = None
) -> tuple[Outcome, TaskRunner]:
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    sandbox = Sandbox(tmp_path, enabled=False)  # the sandbox itself is tested with bwrap elsewhere
    ctx = TaskContext(stub, sandbox, 5, tasks_dir, faults.behaviour(mode))  # type: ignore[arg-type]
    runner = TaskRunner(ctx, task)
    return runner.run(), runner


COPY = [
    "python3",
    "-c",
    "import os; d = open('in.txt').read(); open('out.txt', 'w').write(d.upper() + os.environ['GREETING'])",
]


def test_runner_happy_path(tmp_path: Path) -> None:
    stub = StubClient({"in.txt": b"abc"})
    outcome, runner = run_task(
        tmp_path, assignment(COPY, {"in.txt": b"abc"}, ["out.txt", "missing.txt"]), stub
    )
    assert outcome is Outcome.REPORTED
    [report] = stub.reports
    assert report.exit_code == 0 and report.host_id == 5
    assert [o.name for o in report.outputs] == ["out.txt"]
    assert stub.uploads["out.txt"][0] == b"ABChello"
    assert report.outputs[0].sha256 == digest_bytes(b"ABChello").sha256
    assert "missing.txt was not produced" in report.stderr_tail
    assert not runner.dir.exists()  # cleaned after the report


def test_uploads_use_the_newest_upload_token_from_the_heartbeats(tmp_path: Path) -> None:
    stub = StubClient({})
    slow = ["python3", "-c", "import time; time.sleep(2.5); open('out.txt', 'w').write('x')"]
    outcome, _ = run_task(tmp_path, assignment(slow, {}, ["out.txt"]), stub)
    assert outcome is Outcome.REPORTED and stub.heartbeats >= 2
    assert stub.upload_tokens["out.txt"].startswith("UPLOAD-")  # not the assignment's "UPLOAD"
    assert int(stub.upload_tokens["out.txt"].removeprefix("UPLOAD-")) >= 2


def test_runner_input_mismatch_reports_minus_one(tmp_path: Path) -> None:
    stub = StubClient({"in.txt": b"tampered"})
    outcome, _ = run_task(tmp_path, assignment(COPY, {"in.txt": b"abc"}, ["out.txt"]), stub)
    assert outcome is Outcome.INPUT_ERROR
    [report] = stub.reports
    assert report.exit_code == -1 and report.outputs == [] and "sha256" in report.stderr_tail
    assert stub.uploads == {}


def test_runner_abort_from_heartbeat_drops_task(tmp_path: Path) -> None:
    stub = StubClient({})
    stub.abort_after = 1
    outcome, _ = run_task(tmp_path, assignment(["sleep", "30"], {}, ["out.txt"]), stub)
    assert outcome is Outcome.ABORTED and stub.reports == [] and stub.uploads == {}


def test_runner_corrupt_reports_refused_output(tmp_path: Path) -> None:
    stub = StubClient({"in.txt": b"abc"}, upload_status={"out.txt": 422})
    outcome, _ = run_task(tmp_path, assignment(COPY, {"in.txt": b"abc"}, ["out.txt"]), stub, "corrupt")
    assert outcome is Outcome.REPORTED
    sent, declared = stub.uploads["out.txt"]
    assert declared == digest_bytes(b"ABChello") != digest_bytes(sent)
    [report] = stub.reports
    assert [o.sha256 for o in report.outputs] == [declared.sha256]
    assert "refused: HTTP 422" in report.stderr_tail


def test_runner_fail_extra_and_vanish(tmp_path: Path) -> None:
    stub = StubClient({"in.txt": b"abc"}, upload_status={"extra.bin": 403})
    task = assignment(COPY, {"in.txt": b"abc"}, ["out.txt"])
    outcome, _ = run_task(tmp_path, task, stub, "extra")
    assert outcome is Outcome.REPORTED and "extra.bin" in stub.uploads
    assert [o.name for o in stub.reports[-1].outputs] == ["out.txt"]

    outcome, _ = run_task(tmp_path, task, stub, "fail")
    assert outcome is Outcome.REPORTED and stub.reports[-1].exit_code == 3

    stub = StubClient({})
    outcome, _ = run_task(tmp_path, assignment(["sleep", "30"], {}, ["out.txt"]), stub, "vanish")
    assert outcome is Outcome.VANISHED and stub.reports == [] and stub.heartbeats == 0


def test_a_finished_task_is_reaped_even_before_its_thread_ends(tmp_path: Path) -> None:
    """A runner wakes the main loop as its last act, while its thread is still alive: the loop must
    count the task as done then, or it waits for a wake-up that already came and never asks for work
    again (an agent seen idle for good in the demo)."""
    from airlock.agent.main import Agent

    opts = AgentOptions(server="http://s", user="u", password="pw", work_dir=tmp_path)
    agent = Agent(opts, Sandbox(tmp_path, enabled=False), tmp_path, client=StubClient({}))  # type: ignore[arg-type]
    ctx = TaskContext(StubClient({}), Sandbox(tmp_path, enabled=False), 5, tmp_path, faults.behaviour(None))  # type: ignore[arg-type]
    runner = TaskRunner(ctx, assignment(["true"], {}, ["out.txt"]))
    release = threading.Event()
    still_running = threading.Thread(target=release.wait, daemon=True)
    still_running.start()
    agent.running[runner.tid] = (runner, still_running)
    assert agent._reap() is None and runner.tid in agent.running  # no outcome yet: still running
    runner.outcome = Outcome.REPORTED
    assert agent._reap() is None
    assert agent.running == {} and agent.outcomes[Outcome.REPORTED] == 1
    release.set()
