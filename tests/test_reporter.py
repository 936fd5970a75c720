"""The Reporter against a real SQLite database and real files in a LocalStorage.

Batch 1 (10 jobs, created at T0):
  j1..j4 done, events.root in trusted storage            -> complete
  j5     done, events.root present, log.txt never recorded -> drift: missing output
  j6     done, events.root recorded but gone from storage  -> drift: missing output
  j7     failed, nothing;  j10 failed but its file is in trusted storage -> orphan
  j8     cancelled;        j9 running
Batch 2: one done job with its file. Plus a stray file nobody recorded -> orphan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Connection, insert

from airlock.core.checksums import digest_file
from airlock.db.engine import make_engine, utcnow
from airlock.db.schema import batches, files, hosts, jobs, metadata, tasks, volunteers
from airlock.demo import lbmc
from airlock.reporter.report import Report, build_report, render_console, write_html
from airlock.storage import LocalStorage

HOUR = 3600.0
EVIL = "<script>alert(1)</script>"


@dataclass
class World:
    conn: Connection
    trusted: LocalStorage
    t0: datetime
    job: dict[str, int]
    batch1: int
    batch2: int


def spec(name: str, outputs: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "app": "lbmc",
        "command": ["python3", "lbmc.py", "--seed", "1", "--events", "200", "--out", "events.root"],
        "outputs": [{"name": o, "max_size": 10_000_000} for o in outputs],
        "params": {"seed": 1, "events": 200},
    }


class Builder:
    def __init__(self, conn: Connection, trusted: LocalStorage, src: Path, t0: datetime) -> None:
        self.conn, self.trusted, self.src, self.t0 = conn, trusted, src, t0

    def insert(self, table: Any, **values: Any) -> int:
        result = self.conn.execute(insert(table).values(**values))
        assert result.inserted_primary_key is not None
        return int(result.inserted_primary_key[0])

    def volunteer(self, name: str) -> int:
        return self.insert(
            volunteers,
            name=name,
            password_hash="x",
            authenticator=f"auth-{name}",
            state="active",
            created_at=self.t0,
        )

    def host(self, volunteer_id: int, name: str | None, cores: int, quota: int) -> int:
        return self.insert(
            hosts,
            volunteer_id=volunteer_id,
            name=name,
            platform="x86_64-pc-linux-gnu",
            cores=cores,
            memory_mb=4096,
            disk_mb=20000,
            daily_quota=quota,
            created_at=self.t0,
        )

    def job(
        self, batch_id: int, name: str, state: str, *, hours: float | None = None, outputs: int = 1
    ) -> int:
        names = ["events.root", "log.txt"][:outputs]
        finished = self.t0 + timedelta(hours=hours) if hours is not None else None
        return self.insert(
            jobs,
            batch_id=batch_id,
            name=name,
            app="lbmc",
            spec=spec(name, names),
            cores=1,
            memory_mb=512,
            disk_mb=100,
            copies=1,
            quorum=1,
            max_attempts=3,
            deadline_s=86400,
            state=state,
            created_at=self.t0,
            updated_at=finished or self.t0,
            finished_at=finished,
        )

    def trusted_file(self, job_id: int, key: str, *, stored: bool = True) -> None:
        digest = digest_file(self.src)
        if stored:
            self.trusted.copy_in(key, self.src, digest)
        self.insert(
            files,
            kind="trusted",
            state="trusted",
            name="events.root",
            size=digest.size,
            adler32=digest.adler32,
            sha256=digest.sha256,
            location=key,
            job_id=job_id,
            created_at=self.t0,
        )

    def task(
        self, job_id: int, host_id: int, state: str, verdict: str | None = None, exit_code: int | None = None
    ) -> None:
        self.insert(
            tasks,
            job_id=job_id,
            host_id=host_id,
            state=state,
            created_at=self.t0,
            verdict=verdict,
            exit_code=exit_code,
        )


@pytest.fixture
def world(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'airlock.db'}")
    metadata.create_all(engine)
    trusted = LocalStorage(tmp_path / "trusted-store", fsync=False)
    events = tmp_path / "events.root"
    lbmc.write(str(events), 1, lbmc.generate(1, 200))
    t0 = utcnow() - timedelta(days=1)
    with engine.begin() as conn:
        b = Builder(conn, trusted, events, t0)
        alice, bob = b.volunteer("alice"), b.volunteer(EVIL)
        h1, h2, h3, _h4 = (
            b.host(alice, "laptop", 2, 8),
            b.host(bob, "tower", 1, 4),
            b.host(bob, "nas", 4, 2),
            b.host(alice, None, 1, 1),
        )
        batch1 = b.insert(batches, name="lambda-b", upstream="airlock", created_at=t0)
        batch2 = b.insert(batches, name="second", upstream="airlock", created_at=t0)
        job = {
            f"j{i}": b.job(batch1, f"j{i}", "done", hours=i, outputs=2 if i == 5 else 1) for i in range(1, 7)
        }
        job |= {
            "j7": b.job(batch1, "j7", "failed"),
            "j8": b.job(batch1, "j8", "cancelled"),
            "j9": b.job(batch1, "j9", "running"),
            "j10": b.job(batch1, "j10", "failed"),
            "k1": b.job(batch2, "k1", "done", hours=0.5),
        }
        for name in ("j1", "j2", "j3", "j4", "j5", "j10", "k1"):
            b.trusted_file(job[name], f"trusted/{job[name]}/events.root")
        b.trusted_file(job["j6"], f"trusted/{job['j6']}/events.root", stored=False)
        trusted.copy_in("trusted/stray/events.root", events, digest_file(events))

        for name in ("j1", "j2", "j3", "j4"):
            b.task(job[name], h1, "valid")
        b.task(job["j7"], h1, "error", "payload exited with code 137\nstderr: Killed")
        b.task(job["j8"], h1, "lost")
        for name in ("j5", "j6"):
            b.task(job[name], h2, "valid")
        for name in ("j1", "j2"):
            b.task(job[name], h2, "invalid", "events.root: m_pmu = 7000 outside the physical range")
        b.task(job["j7"], h2, "error", None, exit_code=2)
        b.task(job["j3"], h2, "aborted")
        b.task(job["j9"], h2, "leased")
        b.task(job["k1"], h3, "valid")
    with engine.connect() as conn:
        yield World(conn, trusted, t0, job, batch1, batch2)
    engine.dispose()


def rows_by_state(report: Report) -> dict[str, tuple[int, int, int]]:
    return {r.state: (r.jobs, r.jobs_with_all_outputs, r.files_found) for r in report.reconciliation.rows}


def test_reconciliation_of_one_batch(world: World) -> None:
    report = build_report(world.conn, world.trusted, batch_id=world.batch1)
    rec = report.reconciliation
    assert rows_by_state(report) == {
        "done": (6, 4, 5),
        "failed": (2, 1, 1),
        "cancelled": (1, 0, 0),
        "queued": (0, 0, 0),
        "running": (1, 0, 0),
        "validating": (0, 0, 0),
        "assimilating": (0, 0, 0),
    }
    assert [r.state for r in rec.rows][:3] == ["done", "failed", "cancelled"]
    assert rec.files_recorded == 7
    assert rec.files_in_storage == 8
    j5, j6, j10 = world.job["j5"], world.job["j6"], world.job["j10"]
    assert {(m.job_id, m.name, m.key) for m in rec.done_missing} == {
        (j5, "log.txt", None),
        (j6, "events.root", f"trusted/{j6}/events.root"),
    }
    assert {(o.key, o.job_id) for o in rec.orphans} == {
        (f"trusted/{j10}/events.root", j10),
        ("trusted/stray/events.root", None),
    }
    assert rec.drift


def test_reconciliation_of_everything_counts_the_other_batch(world: World) -> None:
    rec = build_report(world.conn, world.trusted).reconciliation
    assert rows_by_state_of(rec.rows)["done"] == (7, 5, 6)
    assert rec.files_recorded == 8
    assert len(rec.orphans) == 2


def rows_by_state_of(rows: list[Any]) -> dict[str, tuple[int, int, int]]:
    return {r.state: (r.jobs, r.jobs_with_all_outputs, r.files_found) for r in rows}


def test_no_drift_when_storage_matches(world: World) -> None:
    rec = build_report(world.conn, world.trusted, batch_id=world.batch2).reconciliation
    assert [(r.state, r.jobs) for r in rec.rows if r.jobs] == [("done", 1)]
    # the stray file cannot be attributed to a batch, so every batch's report shows it
    assert [o.key for o in rec.orphans] == ["trusted/stray/events.root"]
    world.trusted.delete("trusted/stray/events.root")
    assert not build_report(world.conn, world.trusted, batch_id=world.batch2).reconciliation.drift


def test_return_times(world: World) -> None:
    report = build_report(world.conn, world.trusted)
    one, two = report.return_times
    assert (one.batch_id, one.jobs, one.done) == (world.batch1, 10, 6)
    assert one.times_s == pytest.approx([h * HOUR for h in range(1, 7)])
    assert one.first_s == pytest.approx(HOUR)
    assert one.p50_s == pytest.approx(5 * HOUR)  # the 5th of 10 results
    assert one.p90_s is None and one.p100_s is None  # only 6 of 10 ever came back
    assert (two.jobs, two.done) == (1, 1)
    assert two.first_s == two.p50_s == two.p90_s == two.p100_s == pytest.approx(0.5 * HOUR)
    assert [
        rt.batch_id for rt in build_report(world.conn, world.trusted, batch_id=world.batch2).return_times
    ] == [world.batch2]


def test_success_per_host(world: World) -> None:
    hosts_ = {h.host_name: h for h in build_report(world.conn, world.trusted, batch_id=world.batch1).hosts}
    assert set(hosts_) == {"laptop", "tower"}  # hosts without tasks in the batch are left out
    laptop, tower = hosts_["laptop"], hosts_["tower"]
    assert laptop.tasks == {"valid": 4, "invalid": 0, "error": 1, "lost": 1, "aborted": 0}
    assert laptop.success_rate == pytest.approx(4 / 6)
    assert (laptop.volunteer, laptop.daily_quota, laptop.cores, laptop.in_progress) == ("alice", 8, 2, 0)
    assert tower.tasks == {"valid": 2, "invalid": 2, "error": 1, "lost": 0, "aborted": 1}
    assert tower.success_rate == pytest.approx(2 / 5)  # aborts do not count against the host
    assert (tower.volunteer, tower.in_progress, tower.daily_quota) == (EVIL, 1, 4)
    everything = build_report(world.conn, world.trusted).hosts
    assert [h.host_name for h in everything] == ["laptop", "tower", "nas", None]
    assert everything[2].success_rate == 1.0 and everything[3].success_rate is None


def test_outcomes_and_reasons(world: World) -> None:
    out = build_report(world.conn, world.trusted, batch_id=world.batch1).outcomes
    assert out.tasks == {
        "ready": 0,
        "leased": 1,
        "reported": 0,
        "valid": 6,
        "invalid": 2,
        "error": 2,
        "lost": 1,
        "aborted": 1,
    }
    assert [(r.state, r.reason, r.count) for r in out.reasons] == [
        ("invalid", "events.root: m_pmu = 7000 outside the physical range", 2),
        ("error", "exit code 2", 1),
        ("error", "payload exited with code 137", 1),
    ]
    assert build_report(world.conn, world.trusted).outcomes.tasks["valid"] == 7


def test_to_dict_is_json(world: World) -> None:
    report = build_report(world.conn, world.trusted, batch_id=world.batch1)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["reconciliation"]["drift"] is True
    assert data["return_times"][0]["created_at"] == world.t0.isoformat()
    assert data["hosts"][0]["tasks"]["valid"] == 4
    assert len(data["physics_files"]) == 5  # j1..j5: j6's file is gone, j10 is not done


def test_console_shows_the_tables(world: World) -> None:
    console = Console(record=True, width=200)
    render_console(build_report(world.conn, world.trusted, batch_id=world.batch1), console)
    text = console.export_text()
    assert "Jobs by final state vs files in trusted storage" in text
    assert EVIL in text  # printed as text, not interpreted as markup
    assert "trusted/stray/events.root" in text
    assert "5:00:00" in text  # 50 % of the batch after five hours
    assert "66.7 %" in text


def test_html_page_with_plots_and_physics(world: World, tmp_path: Path) -> None:
    report = build_report(world.conn, world.trusted, batch_id=world.batch1)
    page = tmp_path / "report.html"
    write_html(report, page, trusted=world.trusted)
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2  # return-time curve and the m(pμ) histogram
    assert "<script>" not in html and "&lt;script&gt;" in html
    accepted = int(lbmc.generate(1, 200)["accepted"].sum())
    assert f"{5 * accepted} accepted of 1000 generated decays in 5 trusted files" in html
    assert "trusted/stray/events.root" in html


def test_html_without_lbmc_outputs_skips_physics(world: World, tmp_path: Path) -> None:
    world.trusted.delete(f"trusted/{world.job['k1']}/events.root")
    report = build_report(world.conn, world.trusted, batch_id=world.batch2)
    assert report.physics_files == []
    page = tmp_path / "report.html"
    write_html(report, page, trusted=world.trusted)
    html = page.read_text()
    assert "Physics" not in html
    assert html.count("data:image/png;base64,") == 1
