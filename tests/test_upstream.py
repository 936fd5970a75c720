"""The upstream interface without DIRAC: the local upstream, the JDL translation and refusals, and the
gateway's upstream driver (generator, status, output hand-back) over an in-memory upstream, both
backends. The same driver runs against a real DIRAC in tests/test_upstream_dirac.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from airlock.config import load_settings
from airlock.core.states import JobState, TaskState
from airlock.db import schema
from airlock.db.engine import read
from airlock.reporter.upstream import reconcile_upstream
from airlock.upstream.base import OutputFile, Upstream, UpstreamError, UpstreamJob, UpstreamStatus
from airlock.upstream.dirac_client import MatchedJob
from airlock.upstream.jdl import output_lfn, translate
from airlock.upstream.local import LocalUpstream
from airlock.upstream.registry import set_upstream_sync
from airlock.upstream.sync import UpstreamSync, trace, upstream_of_job

from .helpers import Api, job

SETTINGS = load_settings(data_dir=Path("/nonexistent"))


def matched(jdl_extra: str = "", **fields: Any) -> MatchedJob:
    f: dict[str, Any] = {
        "Executable": "/bin/sh",
        "Arguments": "run.sh 42",
        "InputSandbox": ["in.txt", "run.sh"],
        "InputData": [],
        "OutputSandbox": ["result.txt", "std.out"],
        "OutputData": ["result.txt"],
        "OutputSE": ["BOINC-SE"],
        "OutputPath": "/airlock/out/j1",
        "CPUTime": 7200,
        "JobName": "j1",
        "JobType": "User",
    }
    f.update(fields)
    jdl = '[\n  JobID = 7;\n  Executable = "/bin/sh";\n' + jdl_extra + "]\n"
    return MatchedJob.from_reply(
        {
            "job_id": 7,
            "jdl": jdl,
            "owner": "alice",
            "owner_group": "dirac_user",
            "owner_dn": "/O=Airlock/OU=Users/CN=alice",
            "vo": "airlock",
            "fields": f,
            "input_sandbox_pfns": ["SB:ProductionSandboxSE|/S/alice/x.tar.bz2"],
        }
    )


# ------------------------------------------------------------------------------------ JDL translation
def test_a_plain_jdl_becomes_one_airlock_job() -> None:
    job = translate(matched(), SETTINGS)
    assert job.problem is None
    assert job.ref == "7" and job.owner == "alice" and job.name == "j1"
    # stdout goes to std.out because the job wants it back; the payload is Executable + Arguments
    assert job.command == (
        "/bin/sh",
        "-c",
        'exec "$@" >std.out',
        "airlock-dirac-job",
        "/bin/sh",
        "run.sh",
        "42",
    )
    assert job.outputs == ("result.txt", "std.out")
    assert job.output_sandbox == ("result.txt", "std.out")
    assert job.output_data == (OutputFile("result.txt", "/airlock/out/j1/result.txt", "BOINC-SE"),)
    assert job.inputs == ("SB:ProductionSandboxSE|/S/alice/x.tar.bz2",)
    assert job.runtime_s == 7200 and job.cores == 1
    assert UpstreamJob.from_json(job.to_json()) == job  # what the database keeps


def test_a_script_of_the_sandbox_and_input_data() -> None:
    job = translate(
        matched(
            Executable="run.py",
            Arguments="--n 3",
            OutputSandbox=["o.dat"],
            OutputData=[],
            InputSandbox=["run.py"],
            InputData=["/airlock/data/in.root"],
        ),
        SETTINGS,
    )
    assert job.problem is None
    assert job.command == ("python3", "run.py", "--n", "3")  # nothing to redirect: std.out not wanted
    assert job.inputs[-1] == "LFN:/airlock/data/in.root"


def test_lfns_follow_dirac_conventions() -> None:
    kw: dict[str, Any] = {"vo": "airlock", "owner": "alice", "job_id": 12345}
    assert output_lfn("LFN:/airlock/x/y.root", output_path=None, **kw) == "/airlock/x/y.root"
    assert output_lfn("y.root", output_path=None, **kw) == "/airlock/user/a/alice/12/12345/y.root"
    assert output_lfn("y.root", output_path="run7", **kw) == "/airlock/user/a/alice/run7/y.root"
    assert output_lfn("y.root", output_path="/airlock/prod/", **kw) == "/airlock/prod/y.root"


@pytest.mark.parametrize(
    ("fields", "extra", "reason"),
    [
        ({"Executable": "$DIRACROOT/scripts/dirac-jobexec"}, "", "unknown executable"),
        ({"Executable": "evil.bin"}, "", "unknown executable"),
        ({"NumberOfProcessors": 8}, "", "NumberOfProcessors 8"),
        ({"MinNumberOfProcessors": 4, "MaxNumberOfProcessors": 8}, "", "MinNumberOfProcessors 4"),
        ({"NumberOfProcessors": "many"}, "", "NumberOfProcessors -1"),
        ({"Tags": ["GPU"]}, "", "unsupported requirement: Tags GPU"),
        ({"Tag": ["WholeNode"]}, "", "unsupported requirement: Tags WholeNode"),
        ({"CPUTime": "a week"}, "", "CPUTime -1"),
        ({"CPUTime": 10**9}, "", "CPUTime"),
        ({"OutputSandbox": ["*.log"]}, "", "pattern"),
        ({"OutputData": ["r.txt"], "OutputSE": []}, "", "OutputData without an OutputSE"),
        ({"JobType": "DataReconstruction"}, "", "unsupported JobType"),
        ({"OutputSandbox": ["in.txt"]}, "", "names of inputs"),
        ({"Arguments": "'unclosed"}, "", "Arguments do not parse"),
    ],
)
def test_jdl_airlock_cannot_run_is_refused_with_a_reason(
    fields: dict[str, Any], extra: str, reason: str
) -> None:
    job = translate(matched(extra, **fields), SETTINGS)
    assert job.problem is not None and reason in job.problem, job.problem


def test_requirements_come_from_the_worker_s_parsed_fields_not_the_raw_jdl() -> None:
    """The worker parses the JDL with DIRAC's ClassAd and passes NumberOfProcessors, Tags/Tag, StdOutput,
    StdError, Platform; the translation reads those, and nothing of the raw JDL text."""
    m = matched(
        '  NumberOfProcessors = 64;\n  Tags = {"GPU"};\n  StdOutput = "ignored.log";\n',
        NumberOfProcessors=1,
        Tags=["1Processors"],
        Tag=[],
        StdOutput="o.log",
        StdError="e.log",
        OutputSandbox=["result.txt", "o.log", "e.log"],
        Platform="x86_64-el9",
    )
    assert (m.number_of_processors, m.tags, m.std_output, m.std_error, m.platform) == (
        1,
        ("1Processors",),
        "o.log",
        "e.log",
        "x86_64-el9",
    )
    job = translate(m, SETTINGS)
    assert job.problem is None, job.problem
    assert job.cores == 1 and job.extra["platform"] == "x86_64-el9"
    assert job.command[:3] == ("/bin/sh", "-c", 'exec "$@" >o.log 2>e.log')


def test_operator_settings_widen_what_is_accepted() -> None:
    s = load_settings(data_dir=Path("/x"), dirac_tags=["GPU"], dirac_max_cores=8, dirac_output_se="SE-2")
    # DIRAC's JobScheduling optimizer adds "8Processors" and "MultiProcessor" to a job's Tags
    fields = {"NumberOfProcessors": 8, "Tags": ["8Processors", "MultiProcessor", "GPU"], "OutputSE": []}
    job = translate(matched(**fields), s)
    assert job.problem is None and job.cores == 8 and job.output_data[0].se == "SE-2"
    ranged = translate(matched(MinNumberOfProcessors=2, MaxNumberOfProcessors=16, Tag=["MultiProcessor"]), s)
    assert ranged.problem is None and ranged.cores == 2


def test_default_settings_keep_airlock_own_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(data_dir=Path("/x"))
    assert s.upstream == "airlock"
    with pytest.raises(ValueError, match="dirac_dir"):
        load_settings(data_dir=Path("/x"), upstream="dirac")
    monkeypatch.setenv("AIRLOCK_DIRAC_TAGS", '["GPU", "SSD"]')
    assert load_settings(data_dir=Path("/x")).dirac_tags == ["GPU", "SSD"]


# --------------------------------------------------------------------------------------- local upstream
def test_local_upstream_fetches_nothing_and_records_reports(api: Api) -> None:
    batch = api.submit(job("a"))
    local = LocalUpstream(api.gw.engine)
    assert isinstance(local, Upstream)
    assert local.fetch_job() is None
    ref = str(batch["jobs"][0])
    uj = UpstreamJob(ref, "a", None, None, None, (), (), ("out.txt",), ("out.txt",), ())
    local.report_status(uj, UpstreamStatus("Done", "Execution Complete"))
    assert local.heartbeat(uj, {}) == {}
    assert local.upload_output_sandbox(uj, []) is None
    with read(api.gw.engine) as conn:
        ev = conn.execute(select(schema.events).where(schema.events.c.action == "upstream.status")).one()
    assert ev.object_id == batch["jobs"][0] and ev.detail["status"] == "Done"
    assert api.loops() == 0  # no upstream loops with the default upstream


# ------------------------------------------------------------------------ the driver over a fake upstream
@dataclass
class FakeUpstream:
    """An upstream in memory: what the gateway told it, and failures to inject."""

    jobs: list[UpstreamJob] = field(default_factory=list)
    inputs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commands: dict[str, dict[str, str]] = field(default_factory=dict)
    statuses: dict[str, list[UpstreamStatus]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    sandboxes: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    catalog: dict[str, bytes] = field(default_factory=dict)
    rescheduled: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    fail_once: set[str] = field(default_factory=set)
    crash_after: set[str] = field(default_factory=set)  # the op takes effect, then "the gateway dies"
    sizes_known: bool = True  # whether input_sizes can tell (else the downloaded bytes are checked)
    uploaded: dict[str, list[str]] = field(default_factory=dict)  # output sandbox refs held per job
    name: str = "dirac"

    def _op(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail_once:
            self.fail_once.discard(op)
            raise UpstreamError(f"{op} failed (injected)")

    def fetch_job(self) -> UpstreamJob | None:
        self._op("fetch_job")
        return self.jobs.pop(0) if self.jobs else None

    def _crash(self, op: str) -> None:
        if op in self.crash_after:
            self.crash_after.discard(op)
            raise UpstreamError(f"crash after {op} (injected)")

    def input_sizes(self, job: UpstreamJob) -> Mapping[str, int | None]:
        self._op("input_sizes")
        total = sum(len(d) for d in self.inputs.get(job.ref, {}).values())
        # the fake's job has one input reference (its sandbox), holding all its files
        return {ref: (total if self.sizes_known and i == 0 else None) for i, ref in enumerate(job.inputs)}

    def output_sandboxes(self, job: UpstreamJob) -> Sequence[str]:
        self._op("output_sandboxes")
        return list(self.uploaded.get(job.ref, []))

    def download_inputs(self, job: UpstreamJob, dest: Path) -> list[Path]:
        self._op("download_inputs")
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.inputs.get(job.ref, {}).items():
            (dest / name).write_bytes(data)
        return sorted(dest.iterdir())

    def report_status(self, job: UpstreamJob, status: UpstreamStatus) -> None:
        self._op(f"status:{status.status}")
        self.statuses.setdefault(job.ref, []).append(status)

    def set_parameters(self, job: UpstreamJob, params: Mapping[str, str | int | float]) -> None:
        self.params.setdefault(job.ref, {}).update(params)

    def heartbeat(self, job: UpstreamJob, metrics: Mapping[str, str | int | float]) -> Mapping[str, str]:
        self._op("heartbeat")
        return self.commands.pop(job.ref, {})

    def upload_output_sandbox(self, job: UpstreamJob, files: Sequence[Path]) -> str | None:
        self._op("upload_output_sandbox")
        self.sandboxes.setdefault(job.ref, []).extend((f.name, f.read_bytes()) for f in files)
        held = self.uploaded.setdefault(job.ref, [])
        held.append(f"SB:fake|{job.ref}/{len(held) + 1}")  # no dedupe: every upload is a new sandbox
        self._crash("upload_output_sandbox")
        return held[-1]

    def output_registered(self, job: UpstreamJob, output: OutputFile) -> bool:
        return output.lfn in self.catalog

    def register_output(self, job: UpstreamJob, output: OutputFile, path: Path) -> None:
        self._op("register_output")
        assert output.lfn not in self.catalog, "registered twice"
        self.catalog[output.lfn] = path.read_bytes()

    def reschedule(self, job: UpstreamJob) -> None:
        self._op("reschedule")
        self.rescheduled.append(job.ref)

    def close(self) -> None:
        return None

    def last(self, ref: str) -> UpstreamStatus:
        return self.statuses[ref][-1]

    def job_state(self, ref: str) -> tuple[str | None, str | None]:
        st = self.statuses.get(ref)
        return (st[-1].status, st[-1].minor) if st else (None, None)


@pytest.fixture
def fake(api: Api) -> Iterator[FakeUpstream]:
    up = FakeUpstream()
    assert isinstance(up, Upstream)
    api.gw.settings = api.gw.settings.model_copy(
        update={"upstream": "dirac", "dirac_dir": Path("/unused"), "dirac_heartbeat_interval_s": 0}
    )
    set_upstream_sync(api.gw, UpstreamSync(api.gw, up))
    yield up


def dirac_job(ref: str, **kw: Any) -> UpstreamJob:
    base = translate(replace_id(matched(), int(ref)), SETTINGS)
    return replace(base, **kw)


def replace_id(m: MatchedJob, job_id: int) -> MatchedJob:
    return replace(m, job_id=job_id, output_path=f"/airlock/out/{job_id}")


def give(up: FakeUpstream, ref: str, **kw: Any) -> UpstreamJob:
    j = dirac_job(ref, **kw)
    up.jobs.append(j)
    up.inputs[ref] = {"in.txt": b"input\n", "run.sh": b'echo "$1" > result.txt\n'}
    return j


def row_of(api: Api, ref: str) -> Any:
    u = schema.upstream_jobs
    with read(api.gw.engine) as conn:
        return conn.execute(select(u).where(u.c.ref == ref).order_by(u.c.attempt.desc())).first()


def run_volunteer(api: Api, outputs: dict[str, bytes] | None = None) -> dict[str, Any]:
    v = api.volunteer()
    (task,) = v.work()
    files = outputs or {"result.txt": b"42\n", "std.out": b"ran\n"}
    for name, data in files.items():
        assert v.upload(task, data, name).status_code in (200, 201)
    assert v.report(task, 0, files).status_code == 200
    return task


def test_a_job_goes_from_upstream_to_a_volunteer_and_back(api: Api, fake: FakeUpstream) -> None:
    give(fake, "101")
    api.loops()
    row = row_of(api, "101")
    assert row.state == "accepted" and row.job_id is not None
    assert fake.last("101") == UpstreamStatus("Running", "Job accepted by Airlock", "Waiting for a volunteer")
    view = api.job(row.job_id)
    assert view["state"] == "queued"
    # inputs went into the content-addressed cache once
    assert api.count(schema.files, schema.files.c.kind == "input") == 2

    v = api.volunteer()
    (task,) = v.work()
    assert task["command"][-3:] == ["/bin/sh", "run.sh", "42"]
    api.loops()
    assert fake.last("101").status == "Running" and fake.last("101").minor == "Application"
    assert fake.params["101"]["AirlockTasks"] == str(task["task_id"])
    assert fake.params["101"]["AirlockHosts"] == str(v.host_id)
    assert not fake.sandboxes  # nothing before validation
    for name, data in {"result.txt": b"42\n", "std.out": b"ran\n"}.items():
        v.upload(task, data, name)
    v.report(task, 0, {"result.txt": b"42\n", "std.out": b"ran\n"})
    assert not fake.sandboxes
    api.settle()
    assert fake.last("101") == UpstreamStatus("Done", "Execution Complete", "Validated by Airlock")
    assert sorted(fake.sandboxes["101"]) == [("result.txt", b"42\n"), ("std.out", b"ran\n")]
    assert fake.catalog == {"/airlock/out/101/result.txt": b"42\n"}
    seen = [s.status for s in fake.statuses["101"]]
    assert seen.index("Completing") < seen.index("Done")
    assert fake.calls.index("upload_output_sandbox") < fake.calls.index("status:Done")
    assert row_of(api, "101").state == "done"
    api.settle()
    assert fake.calls.count("status:Done") == 1 and fake.calls.count("upload_output_sandbox") == 1

    # traceable both ways
    with read(api.gw.engine) as conn:
        (attempt,) = trace(conn, "dirac", "101")
        assert upstream_of_job(conn, row.job_id) == {
            "upstream": "dirac",
            "ref": "101",
            "attempt": 1,
            "state": "done",
            "reported": attempt["reported"],
        }
        b = conn.execute(select(schema.batches).where(schema.batches.c.id == attempt["batch_id"])).one()
    assert (b.upstream, b.upstream_ref, b.owner) == ("dirac", "101", "alice")
    assert attempt["job_id"] == row.job_id
    assert [(t["id"], t["volunteer_id"], t["host_id"]) for t in attempt["tasks"]] == [
        (task["task_id"], v.id, v.host_id)
    ]


@pytest.mark.parametrize("failing", ["upload_output_sandbox", "register_output", "status:Done"])
def test_a_failure_midway_redoes_and_never_duplicates(api: Api, fake: FakeUpstream, failing: str) -> None:
    give(fake, "102")
    api.loops()
    fake.fail_once.add(failing)
    run_volunteer(api)
    api.settle()
    api.settle()
    assert fake.last("102").status == "Done"
    assert len(fake.sandboxes["102"]) == 2  # one sandbox of two files
    assert list(fake.catalog) == ["/airlock/out/102/result.txt"]
    assert fake.calls.count("status:Done") == (2 if failing == "status:Done" else 1)
    assert fake.calls.index("upload_output_sandbox") < fake.calls.index("status:Done")
    assert row_of(api, "102").state == "done"


def test_unrunnable_and_oversized_jobs_are_refused_and_nothing_is_created(
    api: Api, fake: FakeUpstream
) -> None:
    fake.jobs.append(translate(replace_id(matched(Executable="evil.bin"), 103), SETTINGS))
    give(fake, "104")
    fake.inputs["104"]["big.dat"] = b"x" * 1000
    api.gw.settings = api.gw.settings.model_copy(update={"dirac_max_input_bytes": 500})
    before = api.count(schema.jobs)
    api.loops()
    assert fake.last("103").status == "Failed"
    assert fake.last("103").minor.startswith("Airlock: unknown executable 'evil.bin'")
    assert fake.last("104").minor.startswith("Airlock: inputs too large for volunteers' links")
    assert "(before download)" in fake.last("104").minor
    assert row_of(api, "103").state == "refused" and row_of(api, "104").state == "refused"
    assert api.count(schema.jobs) == before
    # refused from the sizes the upstream gave: nothing was downloaded
    assert "input_sizes" in fake.calls and "download_inputs" not in fake.calls
    assert fake.params["104"]["AirlockRefusal"].startswith("inputs too large")


def test_inputs_of_unknown_size_are_checked_once_downloaded(api: Api, fake: FakeUpstream) -> None:
    fake.sizes_known = False  # e.g. a sandbox SE that cannot tell: the downloaded bytes are the backstop
    give(fake, "112")
    fake.inputs["112"]["big.dat"] = b"x" * 1000
    api.gw.settings = api.gw.settings.model_copy(update={"dirac_max_input_bytes": 500})
    before = api.count(schema.jobs)
    api.loops()
    assert fake.calls.index("input_sizes") < fake.calls.index("download_inputs")
    assert fake.last("112").minor.startswith("Airlock: inputs too large for volunteers' links")
    assert "(as downloaded)" in fake.last("112").minor
    assert row_of(api, "112").state == "refused" and api.count(schema.jobs) == before


def test_inputs_that_fit_are_downloaded_once(api: Api, fake: FakeUpstream) -> None:
    give(fake, "113")
    api.gw.settings = api.gw.settings.model_copy(update={"dirac_max_input_bytes": 1000})
    api.loops()
    assert row_of(api, "113").state == "accepted"
    assert fake.calls.count("input_sizes") == 1 and fake.calls.count("download_inputs") == 1


def test_a_crash_right_after_the_sandbox_upload_does_not_upload_a_second(
    api: Api, fake: FakeUpstream
) -> None:
    """The upload went through but the gateway died before recording ``sandbox_ref``: the redo finds the
    sandbox the upstream now holds (the fake does not dedupe: a second upload would be a second one)."""
    give(fake, "114")
    fake.uploaded["114"] = ["SB:fake|from-an-earlier-pilot"]  # the job had one before Airlock took it
    api.loops()
    fake.crash_after.add("upload_output_sandbox")
    run_volunteer(api)
    api.settle()
    api.settle()
    assert fake.last("114").status == "Done"
    assert fake.calls.count("upload_output_sandbox") == 1
    assert fake.uploaded["114"] == ["SB:fake|from-an-earlier-pilot", "SB:fake|114/2"]
    row = row_of(api, "114")
    assert row.state == "done" and row.sandbox_ref == "SB:fake|114/2"  # ours, not the earlier one


def test_an_upload_that_failed_before_taking_effect_is_made_again(api: Api, fake: FakeUpstream) -> None:
    give(fake, "115")
    fake.uploaded["115"] = ["SB:fake|from-an-earlier-pilot"]
    api.loops()
    fake.fail_once.add("upload_output_sandbox")  # refused before anything was stored
    run_volunteer(api)
    api.settle()
    api.settle()
    assert fake.calls.count("upload_output_sandbox") == 2
    assert fake.uploaded["115"] == ["SB:fake|from-an-earlier-pilot", "SB:fake|115/2"]
    assert row_of(api, "115").sandbox_ref == "SB:fake|115/2"
    assert fake.last("115").status == "Done"


def test_a_refusal_the_upstream_did_not_take_is_retried(api: Api, fake: FakeUpstream) -> None:
    fake.jobs.append(translate(replace_id(matched(Executable="evil.bin"), 105), SETTINGS))
    fake.fail_once.add("status:Failed")
    api.loops()
    assert row_of(api, "105").state == "matched"  # kept: not lost, not left hanging
    api.loops()
    assert row_of(api, "105").state == "refused" and fake.last("105").status == "Failed"


def test_kill_upstream_aborts_the_volunteer_task(api: Api, fake: FakeUpstream) -> None:
    give(fake, "106")
    api.loops()
    v = api.volunteer()
    (task,) = v.work()
    api.loops()
    fake.commands["106"] = {"Kill": ""}
    api.loops()
    row = row_of(api, "106")
    assert row.state == "killed"
    with read(api.gw.engine) as conn:
        killed = conn.execute(select(schema.jobs).where(schema.jobs.c.id == row.job_id)).one()
    assert (killed.state, killed.reason) == (JobState.CANCELLED.value, f"killed in {fake.name}")
    hb = v.heartbeat(task)
    assert hb.status_code == 200 and hb.json()["abort"] is True
    with read(api.gw.engine) as conn:
        st = conn.execute(
            select(schema.tasks.c.state).where(schema.tasks.c.id == task["task_id"])
        ).scalar_one()
    assert st == TaskState.ABORTED.value
    api.settle()
    assert fake.last("106").status == "Killed"  # the kill confirmed, once
    assert fake.calls.count("status:Killed") == 1


@pytest.mark.parametrize("policy", ["fail", "reschedule"])
def test_attempts_run_out_fail_or_reschedule(api: Api, fake: FakeUpstream, policy: str) -> None:
    api.gw.settings = api.gw.settings.model_copy(
        update={"dirac_failure_policy": policy, "dirac_max_attempts": 1}
    )
    give(fake, "107")
    api.loops()
    v = api.volunteer()
    (task,) = v.work()
    assert v.report(task, 1, {}).status_code == 200  # exit code 1: an error, and no attempt left
    api.settle()
    row = row_of(api, "107")
    assert api.job(row.job_id)["state"] == "failed"
    if policy == "fail":
        assert row.state == "failed" and fake.last("107").status == "Failed"
        assert fake.last("107").minor.startswith("Airlock: ")
        assert not fake.rescheduled
    else:
        assert row.state == "rescheduled" and fake.rescheduled == ["107"]
        # matched again later: a new attempt of the same upstream job
        give(fake, "107")
        api.loops()
        with read(api.gw.engine) as conn:
            assert [a["attempt"] for a in trace(conn, "dirac", "107")] == [1, 2]
    assert not fake.sandboxes


def test_matching_stops_while_enough_jobs_wait(api: Api, fake: FakeUpstream) -> None:
    api.gw.settings = api.gw.settings.model_copy(update={"dirac_max_queued": 2})
    for ref in ("201", "202", "203"):
        give(fake, ref)
    api.loops()
    assert [j.ref for j in fake.jobs] == ["203"]
    run_volunteer(api)
    api.loops()
    assert fake.jobs == []


def test_no_credential_material_in_what_volunteers_receive(api: Api, fake: FakeUpstream) -> None:
    give(fake, "108")
    api.loops()
    v = api.volunteer()
    r = v.request()
    assert r.status_code == 200 and r.json()["tasks"]
    for marker in ("BEGIN", "PRIVATE KEY", "CERTIFICATE", "proxy", "X509", "alice"):
        assert marker not in r.text, marker


def test_status_shows_the_upstream_state_next_to_airlock_s(
    api: Api, fake: FakeUpstream, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock.cli import build_parser, console

    give(fake, "109")
    fake.jobs.append(translate(replace_id(matched(Executable="evil.bin"), 110), SETTINGS))
    api.loops()
    run_volunteer(api)
    api.settle()
    monkeypatch.setattr(console, "width", 250)
    s = api.gw.settings
    ns = build_parser().parse_args(
        ["status", "--upstream", "--data-dir", str(s.data_dir), "--database-url", s.db_url]
    )
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    line109 = next(ln for ln in out.splitlines() if " 109 " in ln)
    assert "done" in line109 and "Done (Execution Complete)" in line109
    line110 = next(ln for ln in out.splitlines() if " 110 " in ln)
    assert "refused" in line110 and "Failed (Airlock: unknown executable" in line110


def test_owner_proxies_come_from_the_folder_or_the_command_and_do_not_linger(tmp_path: Path) -> None:
    from airlock.upstream.dirac import OwnerProxies, read_env_file

    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    folder = tmp_path / "proxies"
    folder.mkdir()
    (folder / "alice.proxy").write_bytes(pem)
    store = tmp_path / "store"
    store.mkdir()
    (store / "bob.pem").write_bytes(pem)
    s = load_settings(
        data_dir=tmp_path / "data",
        dirac_owner_proxy_dir=folder,
        dirac_owner_proxy_command=f"cat {store}/{{owner}}.pem",
    )
    proxies = OwnerProxies(s)
    alice = replace(dirac_job("1"), owner="alice")
    with proxies.proxy_file(alice) as p:
        assert p == folder / "alice.proxy"
    with proxies.proxy_file(replace(alice, owner="bob")) as p:
        assert p.read_bytes() == pem and p.parent == s.data_dir / "upstream" / "proxies"
        assert p.stat().st_mode & 0o077 == 0
        made = p
    assert not made.exists()  # written for the one call only
    for owner in ("carol", "../alice", None):
        with pytest.raises(UpstreamError), proxies.proxy_file(replace(alice, owner=owner)):
            pass
    env = tmp_path / "bashrc"
    env.write_text('# DIRAC\nexport DIRACSYSCONFIG="/opt/dirac/etc/dirac.cfg"\nX509_CERT_DIR=/etc/grid\n')
    assert read_env_file(env) == {"DIRACSYSCONFIG": "/opt/dirac/etc/dirac.cfg", "X509_CERT_DIR": "/etc/grid"}


STATUS_ECHO_WORKER = """
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    a = req["args"]
    state = {"Status": a["status"], "MinorStatus": a["minor"], "ApplicationStatus": a.get("application")}
    print(json.dumps({"id": req["id"], "ok": True, "result": state}), flush=True)
"""


def test_set_status_cuts_the_texts_to_dirac_s_columns(tmp_path: Path) -> None:
    """MinorStatus is VARCHAR(128) and ApplicationStatus VARCHAR(255) in DIRAC: longer texts end in "..."
    (with a stand-in worker that echoes what it is sent; the real worker cuts them again)."""
    import sys

    from airlock.upstream.dirac_client import DiracClient, fit_status

    assert fit_status("abc", 3) == "abc" and fit_status("abcd", 3) == "..."
    assert fit_status("a" * 5, 4) == "a..."
    worker = tmp_path / "echo_worker.py"
    worker.write_text(STATUS_ECHO_WORKER)
    with DiracClient(sys.executable, {}, timeout=30, worker=worker) as client:
        st = client.set_status(5, "Failed", "m" * 200, application="a" * 300)
        assert st.minor_status == "m" * 125 + "..." and len(st.minor_status) == 128
        assert st.application_status == "a" * 252 + "..." and len(st.application_status) == 255
        assert client.set_status(5, "Running", "m" * 128).minor_status == "m" * 128  # fits: kept


def test_dirac_input_sizes_map_each_input_reference() -> None:
    """DiracUpstream asks the worker about sandbox PFNs and LFNs (without "LFN:") in one call."""
    from airlock.upstream.dirac import DiracUpstream
    from airlock.upstream.dirac_client import InputSizes

    asked: list[tuple[list[str], list[str]]] = []

    class SizesClient:
        def input_sizes(self, pfns: Sequence[str], lfns: Sequence[str]) -> InputSizes:
            asked.append((list(pfns), list(lfns)))
            return InputSizes(sizes={pfns[0]: 300, "/airlock/data/in.root": None}, errors={"x": "y"})

    job = dirac_job("9", inputs=("SB:ProductionSandboxSE|/S/a.tar.bz2", "LFN:/airlock/data/in.root"))
    up = DiracUpstream(SETTINGS, client=SizesClient())  # type: ignore[arg-type]
    assert up.input_sizes(job) == {
        "SB:ProductionSandboxSE|/S/a.tar.bz2": 300,
        "LFN:/airlock/data/in.root": None,
    }
    assert asked == [(["SB:ProductionSandboxSE|/S/a.tar.bz2"], ["/airlock/data/in.root"])]
    assert up.input_sizes(dirac_job("10", inputs=())) == {} and len(asked) == 1


def test_the_reconciliation_flags_drift_between_upstream_and_airlock(api: Api, fake: FakeUpstream) -> None:
    give(fake, "120")
    api.loops()
    run_volunteer(api)
    api.settle()
    assert fake.last("120").status == "Done"
    with read(api.gw.engine) as conn:
        assert not reconcile_upstream(conn, "dirac", fake).drift
    (lfn,) = list(fake.catalog)
    del fake.catalog[lfn]  # the file vanished from the catalog: Done upstream without its files
    with read(api.gw.engine) as conn:
        drift = reconcile_upstream(conn, "dirac", fake)
    assert drift.drift and drift.done_without_files == [f"120: Done upstream, not registered: {lfn}"]
    assert drift.files_without_done == []
    fake.catalog[lfn] = b"42\n"
    fake.statuses["120"].append(UpstreamStatus("Failed", "reset by an operator"))  # no longer Done there
    with read(api.gw.engine) as conn:
        drift = reconcile_upstream(conn, "dirac", fake)
    assert drift.files_without_done == [f"120: Failed upstream, yet {lfn} handed back"]
    assert drift.done_without_files == []
