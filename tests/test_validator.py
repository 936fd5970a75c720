"""The validator on both databases, through the API and the background loops: exit codes, integrity,
archive safety, quorum, host records, and that nothing reaches trusted storage before it is validated."""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from typing import Any

import pytest
from sqlalchemy import update

from airlock.bridge.quarantine import output_key
from airlock.core.checksums import digest_bytes
from airlock.db import schema

from .helpers import Api, Volunteer, job


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"max_archive_unpacked": 1000, "daily_quota_per_core": 10}


# ------------------------------------------------------------------------------------------------ helpers


def finish(
    v: Volunteer,
    t: dict[str, Any],
    files: dict[str, bytes],
    *,
    exit_code: int = 0,
    reported: dict[str, bytes] | None = None,
) -> None:
    """Upload `files`, then report `reported` (default: the same files) with `exit_code`."""
    for name, data in files.items():
        r = v.upload(t, data, name=name)
        assert r.status_code == 201, r.text
    r = v.report(t, exit_code, files if reported is None else reported)
    assert r.status_code == 200, r.text


def tasks_of(api: Api, job_id: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = api.job(job_id)["tasks"]
    return tasks


def task_of(api: Api, task_id: int) -> dict[str, Any]:
    (task,) = [x for x in api.job(_job_of(api, task_id))["tasks"] if x["id"] == task_id]
    found: dict[str, Any] = task
    return found


def _job_of(api: Api, task_id: int) -> int:
    from sqlalchemy import select

    from airlock.db.engine import read

    with read(api.gw.engine) as conn:
        return int(
            conn.execute(select(schema.tasks.c.job_id).where(schema.tasks.c.id == task_id)).scalar_one()
        )


def trusted_files(api: Api) -> list[str]:
    root = api.gw.settings.storage_dir / "trusted"
    return (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


def trusted_rows(api: Api) -> int:
    return api.count(schema.files, schema.files.c.kind == "trusted")


def assert_nothing_trusted(api: Api, job_id: int) -> None:
    assert trusted_files(api) == []
    assert trusted_rows(api) == 0
    assert api.job(job_id)["outputs"] == []
    r = api.op("GET", f"/api/v1/jobs/{job_id}/outputs/out.txt")
    assert r.status_code == 404, r.text


def host(api: Api, host_id: int) -> dict[str, Any]:
    (h,) = [h for h in api.op("GET", "/api/v1/hosts").json() if h["id"] == host_id]
    found: dict[str, Any] = h
    return found


# ---------------------------------------------------------------------------------- verdicts on one task


def test_nonzero_exit_code_is_an_error_and_the_job_is_retried(api: Api) -> None:
    (jid,) = api.submit(job("a"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    finish(v, t, {"out.txt": b"partial\n"}, exit_code=3)
    api.settle()
    view = api.job(jid)
    assert [(x["state"], x["verdict"]) for x in view["tasks"]] == [("error", "exit code 3"), ("ready", None)]
    assert view["state"] == "running" and view["attempts"] == 2
    assert_nothing_trusted(api, jid)
    h = host(api, v.host_id)
    assert (h["n_error"], h["n_valid"], h["daily_quota"]) == (1, 0, 9)


def test_declared_output_never_uploaded_is_invalid(api: Api) -> None:
    two = [{"name": "out.txt", "max_size": 100}, {"name": "log.txt", "max_size": 100}]
    (jid,) = api.submit(job("a", outputs=two))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    # uploads one of the two, but claims both
    finish(v, t, {"out.txt": b"1\n"}, reported={"out.txt": b"1\n", "log.txt": b"log\n"})
    api.settle()
    task = tasks_of(api, jid)[0]
    assert task["state"] == "invalid"
    assert "log.txt" in task["verdict"] and "never uploaded" in task["verdict"]
    assert_nothing_trusted(api, jid)


def test_output_missing_from_the_report_is_invalid(api: Api) -> None:
    (jid,) = api.submit(job("a"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    finish(v, t, {"out.txt": b"1\n"}, reported={})
    api.settle()
    task = tasks_of(api, jid)[0]
    assert task["state"] == "invalid" and "does not list output out.txt" in task["verdict"]


def test_reported_checksums_that_differ_from_the_upload_are_invalid(api: Api) -> None:
    (jid,) = api.submit(job("a"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    finish(v, t, {"out.txt": b"uploaded\n"}, reported={"out.txt": b"claimed\n"})
    api.settle()
    task = tasks_of(api, jid)[0]
    assert task["state"] == "invalid"
    assert task["verdict"] == "out.txt: the reported checksums differ from the uploaded file's"
    assert_nothing_trusted(api, jid)
    assert host(api, v.host_id)["n_invalid"] == 1


def test_quarantined_file_changed_on_disk_after_upload_is_invalid(api: Api) -> None:
    api.submit(job("a"), job("b"))
    v = api.volunteer()
    t1, t2 = v.work(slots=2)
    for t in (t1, t2):
        finish(v, t, {"out.txt": b"honest result\n"})
    path = api.gw.quarantine.local_path(output_key(v.id, t1["task_id"], "out.txt"))
    assert path is not None and path.read_bytes() == b"honest result\n"
    path.write_bytes(b"swapped result\n")
    gone = api.gw.quarantine.local_path(output_key(v.id, t2["task_id"], "out.txt"))
    assert gone is not None
    gone.unlink()
    api.settle()
    a, b = task_of(api, t1["task_id"]), task_of(api, t2["task_id"])
    assert a["state"] == "invalid" and "no longer matches its checksums" in a["verdict"]
    assert b["state"] == "invalid" and "missing" in b["verdict"]
    assert trusted_files(api) == [] and trusted_rows(api) == 0


# -------------------------------------------------------------------------------------------- archives


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, val in kw.items():
        setattr(info, k, val)
    return info


def zip_bytes(members: list[tuple[str, bytes, int | None]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


SAFE_TAR = tar_bytes(
    [
        (ti("./", tarfile.DIRTYPE), None),
        (ti("./data", tarfile.DIRTYPE), None),
        (ti("./data/hist.txt"), b"1 2 3\n"),
        (ti("summary.json"), b'{"n": 3}\n'),
    ]
)
ARCHIVES: dict[str, tuple[bytes, str | None]] = {
    # name: (bytes, None if valid else a fragment of the verdict)
    "safe.tar.gz": (SAFE_TAR, None),
    "safe.tar": (tar_bytes([(ti("a.txt"), b"a\n"), (ti("d", tarfile.DIRTYPE), None)], "w"), None),
    "safe.zip": (
        zip_bytes([("dir/", b"", 0o040755), ("dir/a.txt", b"a\n", 0o100644), ("b", b"b", None)]),
        None,
    ),
    "abs.tar.gz": (tar_bytes([(ti("/etc/cron.d/evil"), b"* * * * * root sh\n")]), "absolute path"),
    "dotdot.tar.gz": (tar_bytes([(ti("data/../../escape.txt"), b"x")]), "climbs out"),
    "dotdot2.tar.gz": (tar_bytes([(ti("../x"), b"x")]), "climbs out"),
    "symlink.tar.gz": (
        tar_bytes([(ti("passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), None)]),
        "is a link",
    ),
    "hardlink.tar.gz": (
        tar_bytes([(ti("a.txt"), b"a"), (ti("h", tarfile.LNKTYPE, linkname="/etc/shadow"), None)]),
        "is a link",
    ),
    "device.tar.gz": (
        tar_bytes([(ti("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)]),
        "device or special file",
    ),
    "block.tar": (tar_bytes([(ti("sda", tarfile.BLKTYPE, devmajor=8), None)], "w"), "device or special"),
    "fifo.tar.gz": (tar_bytes([(ti("pipe", tarfile.FIFOTYPE), None)]), "device or special file"),
    "big.tar.gz": (tar_bytes([(ti("a.txt"), b"0" * 600), (ti("b.txt"), b"0" * 600)]), "more than 1000 bytes"),
    "abs.zip": (zip_bytes([("/etc/evil", b"x", None)]), "absolute path"),
    "backslash.zip": (zip_bytes([("..\\..\\evil", b"x", None)]), "absolute path"),
    "dotdot.zip": (zip_bytes([("a/../../evil", b"x", None)]), "climbs out"),
    "symlink.zip": (zip_bytes([("link", b"/etc/passwd", 0o120777)]), "link or special file"),
    "big.zip": (zip_bytes([("zeros", b"\0" * 2000, None)]), "more than 1000 bytes"),
    "garbage.tar.gz": (b"this is not an archive at all\n", "not a readable tar archive"),
    "garbage.zip": (b"PK\x03\x04 but not really\n", "not a readable zip archive"),
}


def test_archive_outputs_are_checked_for_safety(api: Api) -> None:
    jobs = [job(f"j-{name}", outputs=[{"name": name, "max_size": 100_000}]) for name in ARCHIVES]
    ids = api.submit(*jobs)["jobs"]
    v = api.volunteer(cores=32, memory_mb=64_000, disk_mb=1_000_000)
    tasks = v.work(slots=len(ARCHIVES))
    assert len(tasks) == len(ARCHIVES)
    for t in tasks:
        name = t["outputs"][0]["name"]
        finish(v, t, {name: ARCHIVES[name][0]})
    api.settle()
    for jid, name in zip(ids, ARCHIVES, strict=True):
        view = api.job(jid)
        task = view["tasks"][0]
        fragment = ARCHIVES[name][1]
        if fragment is None:
            assert task["state"] == "valid", (name, task["verdict"])
            assert view["state"] == "done", name
            (o,) = view["outputs"]
            assert o["sha256"] == digest_bytes(ARCHIVES[name][0]).sha256
        else:
            assert task["state"] == "invalid", (name, task["verdict"])
            assert name in task["verdict"] and fragment in task["verdict"], (name, task["verdict"])
            assert view["outputs"] == [], name
    safe = {n for n, (_, frag) in ARCHIVES.items() if frag is None}
    assert {p.rsplit("/", 1)[1] for p in trusted_files(api)} == safe


# ---------------------------------------------------------------------------------------------- quorum


def test_two_agreeing_replicas_make_the_job_done(api: Api) -> None:
    (jid,) = api.submit(job("q", copies=2, quorum=2))["jobs"]
    a, b = api.volunteer(), api.volunteer()
    (ta,), (tb,) = a.work(), b.work()
    finish(a, ta, {"out.txt": b"agreed\n"})
    api.settle()
    assert api.job(jid)["state"] in ("running", "validating")  # one valid result is not a quorum of two
    assert_nothing_trusted(api, jid)
    finish(b, tb, {"out.txt": b"agreed\n"})
    api.settle()
    view = api.job(jid)
    assert view["state"] == "done" and view["attempts"] == 2
    assert [x["state"] for x in view["tasks"]] == ["valid", "valid"]
    assert view["canonical_task_id"] in (ta["task_id"], tb["task_id"])
    r = api.op("GET", f"/api/v1/jobs/{jid}/outputs/out.txt")
    assert r.status_code == 200 and r.content == b"agreed\n"


def test_disagreement_creates_a_third_task_and_the_majority_wins(api: Api) -> None:
    (jid,) = api.submit(job("q", copies=2, quorum=2, max_attempts=5))["jobs"]
    a, b, c = api.volunteer(), api.volunteer(), api.volunteer()
    (ta,), (tb,) = a.work(), b.work()
    finish(a, ta, {"out.txt": b"right\n"})
    finish(b, tb, {"out.txt": b"wrong\n"})
    api.settle()
    view = api.job(jid)
    assert view["attempts"] == 3
    assert [x["state"] for x in view["tasks"]] == ["valid", "valid", "ready"]
    assert view["state"] != "done"
    assert_nothing_trusted(api, jid)
    assert a.work() == [] and b.work() == []  # the third copy goes to someone else
    (tc,) = c.work()
    assert tc["task_id"] == view["tasks"][2]["id"]
    finish(c, tc, {"out.txt": b"right\n"})
    api.settle()
    view = api.job(jid)
    states = {x["id"]: (x["state"], x["verdict"]) for x in view["tasks"]}
    assert view["state"] == "done"
    assert states[ta["task_id"]][0] == "valid" and states[tc["task_id"]][0] == "valid"
    assert states[tb["task_id"]] == ("invalid", "disagrees with the quorum")
    assert view["canonical_task_id"] in (ta["task_id"], tc["task_id"])
    (o,) = view["outputs"]
    assert o["sha256"] == digest_bytes(b"right\n").sha256 and o["volunteer_id"] in (a.id, c.id)
    assert api.op("GET", f"/api/v1/jobs/{jid}/outputs/out.txt").content == b"right\n"
    assert host(api, b.host_id)["n_invalid"] == 1


def test_max_attempts_exhausted_fails_the_job(api: Api) -> None:
    single, pair = api.submit(job("single", max_attempts=1), job("pair", copies=2, quorum=2, max_attempts=2))[
        "jobs"
    ]
    a, b = api.volunteer(), api.volunteer()
    ta = {t["job_id"]: t for t in a.work(slots=2)}
    (tb,) = b.work()
    assert tb["job_id"] == pair
    finish(a, ta[single], {"out.txt": b"1\n"}, exit_code=1)
    finish(a, ta[pair], {"out.txt": b"mine\n"})
    finish(b, tb, {"out.txt": b"theirs\n"})
    api.settle()
    for jid, attempts in ((single, 1), (pair, 2)):
        view = api.job(jid)
        assert view["state"] == "failed", view
        assert view["attempts"] == attempts and len(view["tasks"]) == attempts
        assert view["finished_at"] is not None
        assert_nothing_trusted(api, jid)
    assert a.work() == [] and b.work() == []


# ------------------------------------------------------------------------------- invariant 4, host record


def test_nothing_reaches_trusted_storage_before_validation(api: Api) -> None:
    (jid,) = api.submit(job("a"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    finish(v, t, {"out.txt": b"result\n"})
    # uploaded and reported, not yet validated
    assert api.job(jid)["state"] == "validating"
    assert_nothing_trusted(api, jid)
    assert api.gw.quarantine.exists(output_key(v.id, t["task_id"], "out.txt"))
    assert api.count(schema.files, schema.files.c.kind == "output") == 1
    api.settle()
    view = api.job(jid)
    assert view["state"] == "done"
    assert trusted_files(api) == [f"{view['batch_id']}/{jid}/out.txt"]
    assert trusted_rows(api) == 1
    (o,) = view["outputs"]
    assert (o["state"], o["volunteer_id"], o["host_id"], o["task_id"]) == (
        "trusted",
        v.id,
        v.host_id,
        t["task_id"],
    )
    assert not api.gw.quarantine.exists(output_key(v.id, t["task_id"], "out.txt"))


def test_host_record_valid_doubles_quota_up_to_the_max_and_failures_take_one_off(api: Api) -> None:
    api.submit(*[job(f"j{i}") for i in range(4)])
    v = api.volunteer(cores=4)
    with api.gw.engine.begin() as conn:
        conn.execute(update(schema.hosts).where(schema.hosts.c.id == v.host_id).values(daily_quota=3))
    t1, t2, t3, t4 = v.work(slots=4)
    expected: list[tuple[dict[str, Any], dict[str, Any], tuple[int, int, int, int]]] = [
        (t1, {}, (1, 0, 0, 6)),  # valid: 3 -> 6
        (t2, {}, (2, 0, 0, 10)),  # valid: 6 -> 12, capped at 10 (the per-core start value)
        (t3, {"exit_code": 2}, (2, 0, 1, 9)),  # error: -1
        (t4, {"reported": {"out.txt": b"lie\n"}}, (2, 1, 1, 8)),  # invalid: -1
    ]
    for t, kw, (n_valid, n_invalid, n_error, quota) in expected:
        finish(v, t, {"out.txt": b"ok\n"}, **kw)
        api.settle()
        h = host(api, v.host_id)
        assert (h["n_valid"], h["n_invalid"], h["n_error"], h["daily_quota"]) == (
            n_valid,
            n_invalid,
            n_error,
            quota,
        )
    # the quota never drops below one
    with api.gw.engine.begin() as conn:
        conn.execute(
            update(schema.hosts)
            .where(schema.hosts.c.id == v.host_id)
            .values(daily_quota=1, dispatched_today=0)
        )
    (jid,) = api.submit(job("last"), name="more")["jobs"]
    (t5,) = [t for t in v.work(slots=4) if t["job_id"] == jid]
    finish(v, t5, {"out.txt": b"ok\n"}, exit_code=1)
    api.settle()
    assert host(api, v.host_id)["daily_quota"] == 1


def test_bytes_changed_after_validation_never_reach_trusted_storage(api: Api) -> None:
    from airlock.validator.validate import validate_pending

    (jid,) = api.submit(job("a"))["jobs"]
    v = api.volunteer()
    (t,) = v.work()
    finish(v, t, {"out.txt": b"validated bytes\n"})
    assert validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings) == 1
    assert api.job(jid)["state"] == "assimilating"
    path = api.gw.quarantine.local_path(output_key(v.id, t["task_id"], "out.txt"))
    assert path is not None
    path.write_bytes(b"swapped in between\n")
    api.settle()
    view = api.job(jid)
    assert view["state"] == "running"  # not stuck in assimilating: the result was revoked
    assert [x["state"] for x in view["tasks"]] == ["invalid", "ready"]
    assert "no longer matches" in view["tasks"][0]["verdict"]
    assert_nothing_trusted(api, jid)
    root = api.gw.settings.storage_dir / "trusted"
    assert [p for p in root.rglob("*") if p.is_file()] == []  # no temporary copy left either
    w = api.volunteer()
    (t2,) = w.work()
    finish(w, t2, {"out.txt": b"honest bytes\n"})
    api.settle()
    assert api.job(jid)["state"] == "done"
    assert api.op("GET", f"/api/v1/jobs/{jid}/outputs/out.txt").content == b"honest bytes\n"


def test_blocking_a_volunteer_withdraws_its_results_not_yet_in_trusted_storage(api: Api) -> None:
    from airlock.validator.validate import validate_pending

    (jid,) = api.submit(job("a", copies=2, quorum=2, max_attempts=4))["jobs"]
    bad, good = api.volunteer(), api.volunteer()
    (tb,) = bad.work()
    finish(bad, tb, {"out.txt": b"same\n"})
    validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings)  # valid, waiting for its pair
    assert api.op("POST", f"/api/v1/volunteers/{bad.id}/block").status_code == 200
    view = api.job(jid)
    assert [(x["volunteer_id"], x["state"]) for x in view["tasks"]][:2] == [
        (bad.id, "invalid"),
        (None, "ready"),
    ]
    (tg,) = good.work()
    finish(good, tg, {"out.txt": b"same\n"})
    api.settle()
    assert api.job(jid)["state"] == "running"  # the blocked volunteer's copy no longer counts
    third = api.volunteer()
    (tt,) = third.work()
    finish(third, tt, {"out.txt": b"same\n"})
    api.settle()
    done = api.job(jid)
    assert done["state"] == "done" and done["outputs"][0]["volunteer_id"] in {good.id, third.id}


def test_batches_isolate_one_bad_job_from_the_others(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verdicts and assimilations are recorded many per transaction: a result tampered with after
    validation, or a verdict whose recording fails, holds back only its own job."""
    from airlock.assimilator.assimilate import assimilate_pending
    from airlock.validator import validate

    ids = api.submit(*(job(f"j{i}") for i in range(4)))["jobs"]
    v = api.volunteer()
    tasks = v.work(slots=4)
    assert len(tasks) == 4
    for i, t in enumerate(tasks):
        finish(v, t, {"out.txt": f"result {i}\n".encode()})
    real_apply = validate._apply
    poisoned = tasks[1]["task_id"]

    def flaky_apply(conn: Any, task: Any, job: Any, verdict: Any, settings: Any) -> bool:
        if task.id == poisoned:
            raise RuntimeError("a bug while recording this verdict")
        return real_apply(conn, task, job, verdict, settings)

    monkeypatch.setattr(validate, "_apply", flaky_apply)
    assert validate.validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings) == 3
    monkeypatch.setattr(validate, "_apply", real_apply)
    states = {jid: api.job(jid)["state"] for jid in ids}
    assert [states[t["job_id"]] for t in tasks] == [
        "assimilating",
        "validating",
        "assimilating",
        "assimilating",
    ]
    tampered = api.gw.quarantine.local_path(output_key(v.id, tasks[2]["task_id"], "out.txt"))
    assert tampered is not None
    tampered.write_bytes(b"swapped in between\n")
    assert assimilate_pending(api.gw.engine, api.gw.quarantine, api.gw.trusted) == 2
    assert [api.job(t["job_id"])["state"] for t in tasks] == ["done", "validating", "running", "done"]
    assert validate.validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings) == 1  # retried
    assert assimilate_pending(api.gw.engine, api.gw.quarantine, api.gw.trusted) == 1
    assert api.op("GET", f"/api/v1/jobs/{tasks[1]['job_id']}/outputs/out.txt").content == b"result 1\n"
    tampered_job = tasks[2]["job_id"]
    assert api.job(tampered_job)["outputs"] == []
    assert str(tampered_job) not in [name.split("/")[1] for name in trusted_files(api)]  # batch/job/name
    assert trusted_rows(api) == 3
    e = schema.events
    assert api.count(e, e.c.action == "job.done") == 3


def test_a_storage_failure_on_one_job_holds_back_only_that_job(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airlock.assimilator import assimilate
    from airlock.storage.base import StorageError
    from airlock.validator.validate import validate_pending

    ids = api.submit(*(job(f"j{i}") for i in range(3)))["jobs"]
    v = api.volunteer()
    for t in v.work(slots=3):
        finish(v, t, {"out.txt": b"result\n"})
    assert validate_pending(api.gw.engine, api.gw.quarantine, api.gw.settings) == 3
    real_copy = assimilate._copy_to_trusted

    def copy(q: Any, trusted: Any, location: str, key: str, expected: Any, syncs: Any = None) -> None:
        if key.split("/")[2] == str(ids[1]):  # trusted/<batch>/<job>/<name>
            raise StorageError("storage unreachable")
        real_copy(q, trusted, location, key, expected, syncs)

    monkeypatch.setattr(assimilate, "_copy_to_trusted", copy)
    assert assimilate.assimilate_pending(api.gw.engine, api.gw.quarantine, api.gw.trusted) == 2
    assert [api.job(j)["state"] for j in ids] == ["done", "assimilating", "done"]
    monkeypatch.setattr(assimilate, "_copy_to_trusted", real_copy)
    assert assimilate.assimilate_pending(api.gw.engine, api.gw.quarantine, api.gw.trusted) == 1
    assert api.job(ids[1])["state"] == "done"


def test_valid_results_are_logged_together_and_every_other_verdict_with_its_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.submit(*[job(f"j{i}") for i in range(3)])
    v = api.volunteer()
    tasks = v.work(slots=3)
    v.complete(tasks[0])
    v.complete(tasks[1])
    v.complete(tasks[2], exit_code=2)
    with caplog.at_level(logging.INFO, logger="airlock.validator"):
        api.settle()
    lines = [r.getMessage() for r in caplog.records if r.name == "airlock.validator"]
    assert lines == [
        f"tasks valid: {tasks[0]['task_id']}, {tasks[1]['task_id']}",
        f"task {tasks[2]['task_id']}: error (exit code 2)",
    ]
