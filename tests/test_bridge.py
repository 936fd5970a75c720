"""The data bridge on both databases: upload-only, create-only, checksummed, per-task, per-volunteer.

Invariants: a volunteer credential may only create NEW declared files under its own task's quarantine
path (never read, list, overwrite or delete); bad input gets a clear 4xx and changes nothing.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from airlock.bridge.quarantine import UploadTarget, output_key, record_upload
from airlock.core.checksums import digest_bytes, format_digest_header, sha256_to_b64
from airlock.db import schema
from airlock.db.engine import read, utcnow

from .helpers import OP, Api, Volunteer, assert_error, job

# ------------------------------------------------------------------------------------------------ helpers


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below `root` (hidden temporary ones included) with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def storage_files(api: Api) -> dict[str, bytes]:
    return files_under(api.gw.settings.storage_dir)


def data_files(api: Api) -> set[str]:
    """Every file the gateway's data folder holds (keys, storage), to spot anything created outside."""
    return set(files_under(api.gw.settings.data_dir))


def stored(api: Api, v: Volunteer, task: dict[str, Any], name: str = "out.txt") -> Path:
    """Where the gateway keeps a task's output in its quarantine folder."""
    return api.gw.settings.storage_dir / output_key(v.id, task["task_id"], name)


def task_dir_files(api: Api, v: Volunteer, task: dict[str, Any]) -> list[str]:
    """The names of the task's files in its volunteer's quarantine folder."""
    folder = api.gw.settings.storage_dir / "quarantine" / str(v.id)
    mine = f"{task['task_id']}."
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    return sorted(n.removeprefix(mine) for n in names if n.startswith(mine))


def output_rows(api: Api, task_id: int) -> list[Any]:
    f = schema.files
    with read(api.gw.engine) as conn:
        return list(conn.execute(select(f).where(f.c.kind == "output", f.c.task_id == task_id)).all())


def put(
    api: Api,
    path: str,
    data: bytes,
    token: str | None,
    *,
    digest_of: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    d = digest_bytes(data if digest_of is None else digest_of)
    hdrs = {"Digest": format_digest_header(d.adler32, d.sha256)}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    return api.client.put(path, content=data, headers=hdrs)


def one_task(api: Api, v: Volunteer | None = None, **job_kw: Any) -> tuple[Volunteer, dict[str, Any]]:
    api.submit(job(f"j-{len(api.volunteers)}", **job_kw))
    v = v or api.volunteer()
    (t,) = v.work()
    return v, t


def upload_path(v: Volunteer, task: dict[str, Any], name: str = "out.txt") -> str:
    return f"/quarantine/{v.id}/{task['task_id']}/{name}"


# ------------------------------------------------------------------------------------------------ tests


def test_upload_creates_the_file_attributed_to_volunteer_and_host(api: Api) -> None:
    v, t = one_task(api)
    data = b"the result\n"
    r = v.upload(t, data)
    assert r.status_code == 201, r.text
    d = digest_bytes(data)
    assert r.json() == {
        "path": upload_path(v, t),
        "size": len(data),
        "adler32": d.adler32,
        "sha256": d.sha256,
    }
    (row,) = output_rows(api, t["task_id"])
    assert (row.volunteer_id, row.host_id, row.job_id) == (v.id, v.host_id, t["job_id"])
    assert (row.state, row.size, row.sha256) == ("quarantined", len(data), d.sha256)
    assert stored(api, v, t).read_bytes() == data
    assert task_dir_files(api, v, t) == ["out.txt"]  # no temporary leftovers


REFUSED_METHODS = ["GET", "HEAD", "DELETE", "MOVE", "PROPFIND", "POST", "COPY", "PATCH", "OPTIONS", "MKCOL"]
OTHER_METHODS = ["LOCK", "UNLOCK", "PROPPATCH", "TRACE"]


def test_every_method_but_put_is_refused_and_bytes_are_never_returned(api: Api) -> None:
    v, t = one_task(api)
    secret = b"volunteer output that nobody may read back 0123456789\n"
    assert v.upload(t, secret).status_code == 201
    before_files, before_rows = storage_files(api), api.snapshot()
    paths = [
        upload_path(v, t),
        f"/quarantine/{v.id}/{t['task_id']}/",
        f"/quarantine/{v.id}/{t['task_id']}",
        f"/quarantine/{v.id}/",
        "/quarantine/",
    ]
    credentials = {
        "upload": {"Authorization": f"Bearer {t['upload_token']}"},
        "access": v.auth,
        "operator": OP,
        "none": {},
    }
    for method in REFUSED_METHODS + OTHER_METHODS:
        for path in paths:
            for who, hdrs in credentials.items():
                r = api.client.request(method, path, headers={**hdrs, "Destination": "/quarantine/x"})
                assert r.status_code == 405, (method, path, who, r.status_code, r.text)
                assert secret not in r.content, (method, path, who)
                assert b"out.txt" not in r.content, (method, path, who)  # not even a listing
                if method != "HEAD":
                    assert_error(r, 405)
    r = api.client.request("DELETE", upload_path(v, t), headers=credentials["upload"])
    assert_error(r, 405, "upload-only")
    assert storage_files(api) == before_files
    assert api.snapshot() == before_rows
    assert stored(api, v, t).read_bytes() == secret


def test_overwrite_with_different_bytes_is_a_conflict_and_keeps_the_original(api: Api) -> None:
    v, t = one_task(api)
    assert v.upload(t, b"original\n").status_code == 201
    before = api.snapshot()
    r = v.upload(t, b"tampered!\n")
    assert stored(api, v, t).read_bytes() == b"original\n"
    assert task_dir_files(api, v, t) == ["out.txt"]
    assert api.snapshot() == before
    assert_error(r, 409, "already uploaded", "immutable")


def test_overwrite_never_changes_the_original_bytes(api: Api) -> None:
    """Whatever status the bridge answers, an attempted overwrite leaves the first upload intact."""
    v, t = one_task(api)
    assert v.upload(t, b"original\n").status_code == 201
    before = api.snapshot()
    for attempt in (b"tampered!\n", b"", b"original\n" * 3):
        r = v.upload(t, attempt)
        assert 400 <= r.status_code < 600 and r.status_code not in (200, 201), r.text
    assert stored(api, v, t).read_bytes() == b"original\n"
    assert task_dir_files(api, v, t) == ["out.txt"]
    assert api.snapshot() == before
    ((row,),) = [output_rows(api, t["task_id"])]
    assert row.sha256 == hashlib.sha256(b"original\n").hexdigest()


def test_identical_retry_answers_200_without_a_second_row(api: Api) -> None:
    v, t = one_task(api)
    data = b"same bytes\n"
    assert v.upload(t, data).status_code == 201
    before = api.snapshot()
    r = v.upload(t, data)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == digest_bytes(data).sha256
    assert api.snapshot() == before
    assert len(output_rows(api, t["task_id"])) == 1
    assert task_dir_files(api, v, t) == ["out.txt"]


def test_a_file_whose_row_was_lost_is_recorded_by_the_retry(api: Api) -> None:
    """The file goes under its name before its row is written: a crash in between leaves the file with
    no row, and the client's retry of the same bytes records it (attributed as the first would have)."""
    v, t = one_task(api)
    data = b"published, then the gateway died\n"
    assert v.upload(t, data).status_code == 201
    with api.gw.engine.begin() as conn:  # as if the row had never been committed
        conn.execute(schema.files.delete().where(schema.files.c.task_id == t["task_id"]))
    assert output_rows(api, t["task_id"]) == []
    r = v.upload(t, data)
    assert r.status_code == 200, r.text
    (row,) = output_rows(api, t["task_id"])
    assert (row.volunteer_id, row.host_id, row.sha256) == (v.id, v.host_id, digest_bytes(data).sha256)
    assert task_dir_files(api, v, t) == ["out.txt"]


def test_two_transactions_recording_one_upload_at_once_make_one_row(api: Api) -> None:
    """A retry that reaches a second gateway process while the first still records the same file: the
    second transaction waits for the first (PostgreSQL's row lock, SQLite's writer turn), then records
    nothing and says so, with no error."""
    v, t = one_task(api)
    with read(api.gw.engine) as conn:
        task = conn.execute(select(schema.tasks).where(schema.tasks.c.id == t["task_id"])).one()
    target = UploadTarget(v.id, task.id, "out.txt", task.job_id, v.host_id, 1000)
    d = digest_bytes(b"both at once\n")
    second: list[bool] = []
    with api.gw.engine.begin() as first:
        assert record_upload(first, target, d, None)

        def record_again() -> None:
            with api.gw.engine.begin() as conn:
                second.append(record_upload(conn, target, d, None))

        racer = threading.Thread(target=record_again)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive() and second == []  # waiting for the first transaction
    racer.join(30)
    assert second == [False]
    assert len(output_rows(api, t["task_id"])) == 1


def test_undeclared_name_is_forbidden_and_creates_nothing(api: Api) -> None:
    v, t = one_task(api)
    before_files, before_rows = storage_files(api), api.snapshot()
    r = v.upload(t, b"x", name="extra.txt")
    assert_error(r, 403, "extra.txt", "not an output", "out.txt")
    assert storage_files(api) == before_files
    assert api.snapshot() == before_rows


PATH_TRICKS = ["..", "%2e%2e", "%2E%2E", "a/b", "a%2Fb", ".hidden", "%2e%2e%2fescape", "..%2f..%2fescape"]
PATH_TRICKS += ["a%00b", ".", "%2e", "..%5cescape", "out.txt%2f..%2f..%2fescape"]


def test_path_tricks_are_refused_and_create_nothing(api: Api) -> None:
    v, t = one_task(api)
    before_files, before_rows = data_files(api), api.snapshot()
    for name in PATH_TRICKS:
        r = v.upload(t, b"escape attempt\n", name=name)
        assert r.status_code in (400, 403, 404, 405), (name, r.status_code, r.text)
        assert_error(r, r.status_code)
        assert data_files(api) == before_files, name
        assert api.snapshot() == before_rows, name
    assert not (api.gw.settings.data_dir / "escape").exists()
    assert not (api.gw.settings.storage_dir / "quarantine" / "escape").exists()
    assert task_dir_files(api, v, t) == []


def test_name_that_is_not_one_path_component_is_a_400_with_the_reason(api: Api) -> None:
    v, t = one_task(api)
    for name, shown in (("%2e%2e", ".."), (".hidden", ".hidden"), ("%2Eout.txt", ".out.txt")):
        r = v.upload(t, b"x", name=name)
        assert_error(r, 400, repr(shown), "one path component")
    assert task_dir_files(api, v, t) == []


def test_oversize_by_content_length_is_413_and_stores_nothing(api: Api) -> None:
    v, t = one_task(api, outputs=[{"name": "out.txt", "max_size": 1000}])
    before_files, before_rows = storage_files(api), api.snapshot()
    r = v.upload(t, b"x" * 1001)
    assert_error(r, 413, "1000", "1001")
    r = v.upload(t, b"x" * 1000)  # exactly the maximum is fine
    assert r.status_code == 201, r.text
    after = storage_files(api)
    assert set(after) - set(before_files) == {output_key(v.id, t["task_id"], "out.txt")}
    assert api.snapshot()["files"] == before_rows["files"] + 1


def test_body_longer_than_declared_maximum_with_a_small_content_length_is_cut_off(api: Api) -> None:
    v, t = one_task(api, outputs=[{"name": "out.txt", "max_size": 1000}])
    before_files, before_rows = storage_files(api), api.snapshot()
    r = v.upload(t, b"y" * 5000, headers={"Content-Length": "10"})
    assert r.status_code in (400, 413), r.text
    assert_error(r, r.status_code)
    assert storage_files(api) == before_files
    assert task_dir_files(api, v, t) == []
    assert api.snapshot() == before_rows


def test_lying_content_length_publishes_nothing(api: Api) -> None:
    v, t = one_task(api)
    before_files, before_rows = storage_files(api), api.snapshot()
    for sent, claimed in ((50, 100), (100, 50), (0, 10)):
        r = v.upload(t, b"z" * sent, headers={"Content-Length": str(claimed)})
        assert_error(r, 400, f"{sent} of {claimed} bytes", "nothing was stored")
        assert storage_files(api) == before_files
        assert task_dir_files(api, v, t) == []
        assert api.snapshot() == before_rows
    assert v.upload(t, b"z" * 50).status_code == 201  # the name is still free


def test_missing_or_bad_content_length_is_refused(api: Api) -> None:
    v, t = one_task(api)
    data = b"payload"
    d = digest_bytes(data)
    hdrs = {
        "Authorization": f"Bearer {t['upload_token']}",
        "Digest": format_digest_header(d.adler32, d.sha256),
    }

    def body() -> Any:
        yield data  # a generator body is sent chunked, without Content-Length

    r = api.client.put(upload_path(v, t), content=body(), headers=hdrs)
    assert_error(r, 400, "content-length")
    for length in ("abc", "-5", "1e3", " 7"):
        r = api.client.put(upload_path(v, t), content=data, headers={**hdrs, "Content-Length": length})
        assert_error(r, 400, "content-length")
    assert task_dir_files(api, v, t) == []


def test_wrong_checksum_is_422_and_leaves_nothing(api: Api) -> None:
    v, t = one_task(api)
    before_rows = api.snapshot()
    r = v.upload(t, b"the real bytes\n", digest_of=b"some other bytes\n")
    assert_error(r, 422, "differ from the digest header", "nothing was stored")
    assert not stored(api, v, t).exists()
    assert task_dir_files(api, v, t) == []  # no hidden partial file either
    assert not api.gw.quarantine.exists(output_key(v.id, t["task_id"], "out.txt"))
    assert api.snapshot() == before_rows
    # the right digest afterwards is accepted: the failed attempt did not take the name
    assert v.upload(t, b"the real bytes\n").status_code == 201


def test_wrong_adler32_alone_is_422(api: Api) -> None:
    v, t = one_task(api)
    data = b"bytes\n"
    d = digest_bytes(data)
    wrong_adler = f"{(int(d.adler32, 16) + 1) & 0xFFFFFFFF:08x}"
    r = v.upload(t, data, headers={"Digest": format_digest_header(wrong_adler, d.sha256)})
    assert_error(r, 422)
    assert task_dir_files(api, v, t) == []


BAD_DIGESTS = [
    (None, "needs a digest header"),
    ("", "needs a digest header"),
    ("garbage", "malformed digest"),
    ("adler32=zzzzzzzz,sha-256=AAAA", "malformed digest"),
    ("sha-256=not*base64", "malformed digest"),
    (f"sha-256={sha256_to_b64('00' * 16)}", "malformed digest"),
    ("adler32=00000001", "must give sha-256"),
    ("md5=rL0Y20zC+Fzt72VPzMSk2A==", "must give sha-256"),
]


def test_missing_or_malformed_digest_is_400(api: Api) -> None:
    v, t = one_task(api)
    before = api.snapshot()
    for digest, fragment in BAD_DIGESTS:
        hdrs = {"Authorization": f"Bearer {t['upload_token']}"}
        if digest is not None:
            hdrs["Digest"] = digest
        r = api.client.put(upload_path(v, t), content=b"data", headers=hdrs)
        assert_error(r, 400, fragment)
    assert task_dir_files(api, v, t) == []
    assert api.snapshot() == before


def test_another_tasks_upload_token_is_forbidden(api: Api) -> None:
    api.submit(job("a"), job("b"))
    v = api.volunteer()
    t1, t2 = v.work(slots=2)
    r = v.upload(t1, b"x", token=t2["upload_token"])
    assert_error(r, 403, f"/quarantine/{v.id}/{t1['task_id']}/out.txt")
    assert task_dir_files(api, v, t1) == []


def test_another_volunteers_path_with_own_token_is_forbidden(api: Api) -> None:
    api.submit(job("a"), job("b"))
    a, b = api.volunteer(), api.volunteer()
    (ta,) = a.work()
    (tb,) = b.work()
    before = storage_files(api)
    # b's token against a's task path, and against a path naming b with a's task
    r = put(api, upload_path(a, ta), b"x", tb["upload_token"])
    assert_error(r, 403, "does not allow")
    r = put(api, upload_path(b, ta), b"x", tb["upload_token"])
    assert_error(r, 403, "does not allow")
    # a's own token for its task, but under b's volunteer folder
    r = put(api, f"/quarantine/{b.id}/{ta['task_id']}/out.txt", b"x", ta["upload_token"])
    assert_error(r, 403)
    assert storage_files(api) == before


def test_an_upload_token_does_not_open_another_volunteers_task_even_with_its_path(api: Api) -> None:
    """A token for /quarantine/<a>/<task of b>: the path matches the scope, but the task is not a's."""
    api.submit(job("a"), job("b"))
    a, b = api.volunteer(), api.volunteer()
    a.work()
    (tb,) = b.work()
    forged = api.gw.issuer.issue(
        a.id, [f"storage.create:/quarantine/{a.id}/{tb['task_id']}"], utcnow(), timedelta(hours=1)
    )
    r = put(api, f"/quarantine/{a.id}/{tb['task_id']}/out.txt", b"x", forged.token)
    assert_error(r, 403, "not assigned to you")


def test_access_token_cannot_upload(api: Api) -> None:
    v, t = one_task(api)
    r = v.upload(t, b"x", token=v.token)
    assert_error(r, 403, "does not allow creating")
    assert task_dir_files(api, v, t) == []


def test_operator_token_and_no_token_cannot_upload(api: Api) -> None:
    v, t = one_task(api)
    r = put(api, upload_path(v, t), b"x", None)
    assert_error(r, 401, "upload token")
    assert r.headers.get("www-authenticate") == "Bearer"
    r = put(api, upload_path(v, t), b"x", OP["Authorization"].removeprefix("Bearer "))
    assert_error(r, 401)
    assert task_dir_files(api, v, t) == []


def test_a_prefix_scope_does_not_grant_sibling_tasks(api: Api) -> None:
    """storage.create:/quarantine/<v>/1 must not grant /quarantine/<v>/12 (prefix match on components)."""
    api.submit(*[job(f"j{i}") for i in range(12)])
    v = api.volunteer(cores=16)
    tasks = v.work(slots=12)
    by_id = {t["task_id"]: t for t in tasks}
    assert 1 in by_id and 12 in by_id
    r = put(api, upload_path(v, by_id[12]), b"x", by_id[1]["upload_token"])
    assert_error(r, 403)


def test_expired_upload_token_is_401(api: Api) -> None:
    v, t = one_task(api)
    scope = [f"storage.create:/quarantine/{v.id}/{t['task_id']}"]
    past = api.gw.issuer.issue(v.id, scope, utcnow() - timedelta(hours=2), timedelta(hours=1))
    negative = api.gw.issuer.issue(v.id, scope, utcnow(), timedelta(minutes=-5))
    for issued in (past, negative):
        r = v.upload(t, b"x", token=issued.token)
        assert_error(r, 401, "expired")
    assert task_dir_files(api, v, t) == []


def test_upload_after_the_lease_expired_is_refused(api: Api) -> None:
    v, t = one_task(api)
    with api.gw.engine.begin() as conn:
        conn.execute(
            update(schema.tasks)
            .where(schema.tasks.c.id == t["task_id"])
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    before = api.snapshot()
    r = v.upload(t, b"late\n")
    assert_error(r, 410, "uploads are closed")
    assert task_dir_files(api, v, t) == []
    assert api.snapshot() == before


def test_upload_after_the_task_was_reported_is_refused(api: Api) -> None:
    api.submit(job("two", outputs=[{"name": "a.txt", "max_size": 100}, {"name": "b.txt", "max_size": 100}]))
    v = api.volunteer()
    (t,) = v.work()
    assert v.upload(t, b"a\n", name="a.txt").status_code == 201
    assert v.report(t, 0, {"a.txt": b"a\n"}).status_code == 200
    before = api.snapshot()
    r = v.upload(t, b"b\n", name="b.txt")
    assert_error(r, 410, "reported")
    assert task_dir_files(api, v, t) == ["a.txt"]
    assert api.snapshot() == before


def test_upload_to_a_cancelled_jobs_task_is_refused(api: Api) -> None:
    v, t = one_task(api)
    assert api.op("POST", f"/api/v1/jobs/{t['job_id']}/cancel").status_code == 200
    r = v.upload(t, b"x")
    assert_error(r, 410, "aborted")
    assert task_dir_files(api, v, t) == []


def test_blocked_volunteers_still_valid_upload_token_is_refused(api: Api) -> None:
    v, t = one_task(api)
    assert api.op("POST", f"/api/v1/volunteers/{v.id}/block").status_code == 200
    before = api.snapshot()
    r = v.upload(t, b"x")
    assert_error(r, 403, "blocked")
    assert task_dir_files(api, v, t) == []
    assert api.snapshot() == before


def test_large_upload_streams_and_verifies(api: Api) -> None:
    v, t = one_task(api, outputs=[{"name": "big.bin", "max_size": "32MB"}])
    assert t["outputs"][0]["max_size"] == 32_000_000
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB of incompressible-ish bytes
    data = block * 320  # 20 MiB
    r = v.upload(t, data)
    assert r.status_code == 201, r.text
    d = digest_bytes(data)
    assert r.json()["size"] == len(data) == 20 * 2**20
    assert (r.json()["adler32"], r.json()["sha256"]) == (d.adler32, d.sha256)
    path = stored(api, v, t, "big.bin")
    assert path.stat().st_size == len(data)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == d.sha256
    assert task_dir_files(api, v, t) == ["big.bin"]
    (row,) = output_rows(api, t["task_id"])
    assert (row.size, row.sha256, row.adler32) == (len(data), d.sha256, d.adler32)


def test_large_upload_with_one_flipped_byte_is_refused_and_leaves_nothing(api: Api) -> None:
    v, t = one_task(api, outputs=[{"name": "big.bin", "max_size": "32MB"}])
    data = bytearray(hashlib.sha256(b"seed").digest() * 2048 * 160)  # 10 MiB
    good = bytes(data)
    data[len(data) // 2] ^= 0xFF
    r = v.upload(t, bytes(data), digest_of=good)
    assert_error(r, 422)
    assert task_dir_files(api, v, t) == []
    assert output_rows(api, t["task_id"]) == []


def test_uploaded_bytes_cannot_be_read_back_through_the_input_cache(api: Api) -> None:
    api.submit(job("a"), job("b"))
    a, b = api.volunteer(), api.volunteer()
    (ta,) = a.work()
    b.work()
    data = b"a's private result\n"
    assert a.upload(ta, data).status_code == 201
    sha = digest_bytes(data).sha256
    for who in (a, b):
        r = api.client.get(f"/api/v1/inputs/{sha}", headers=who.auth)
        assert_error(r, 404, "no input")
        assert data not in r.content
    assert a.report(ta, 0, {"out.txt": data}).status_code == 200
    api.settle()
    assert api.job(ta["job_id"])["state"] == "done"
    r = api.client.get(f"/api/v1/inputs/{sha}", headers=b.auth)  # nor once it is trusted
    assert_error(r, 404)
    assert data not in r.content
