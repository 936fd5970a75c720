"""The report as rich tables on a terminal. Strings from volunteers (host and volunteer names, verdicts)
go in as `Text`, never as markup."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.table import Table
from rich.text import Text

from airlock.reporter.model import Report

MAX_LISTED = 20


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return str(timedelta(seconds=round(seconds)))


def percent(rate: float | None) -> str:
    return "—" if rate is None else f"{100.0 * rate:.1f} %"


def render_console(report: Report, console: Console) -> None:
    scope = "all batches" if report.batch_id is None else f"batch {report.batch_id}"
    console.rule(f"Airlock report — {scope} — {report.generated_at:%Y-%m-%d %H:%M:%S} UTC")
    _reconciliation(report, console)
    _return_times(report, console)
    _hosts(report, console)
    _outcomes(report, console)


def _reconciliation(report: Report, console: Console) -> None:
    rec = report.reconciliation
    table = Table(title="Jobs by final state vs files in trusted storage")
    for col in ("state", "jobs", "with all outputs", "files found"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for row in rec.rows:
        table.add_row(row.state, str(row.jobs), str(row.jobs_with_all_outputs), str(row.files_found))
    table.add_section()
    table.add_row(
        "total",
        str(sum(r.jobs for r in rec.rows)),
        str(sum(r.jobs_with_all_outputs for r in rec.rows)),
        str(sum(r.files_found for r in rec.rows)),
    )
    console.print(table)
    console.print(f"{rec.files_recorded} trusted files recorded, {rec.files_in_storage} in trusted storage")
    if not rec.drift:
        console.print(
            Text("no drift: every done job has its outputs, every stored file has a done job", "green")
        )
        return
    if rec.done_missing:
        console.print(Text(f"{len(rec.done_missing)} outputs of done jobs are missing:", "bold red"))
        for m in rec.done_missing[:MAX_LISTED]:
            console.print(Text(f"  job {m.job_id} ({m.job_name}): {m.name} at {m.key or '(never recorded)'}"))
    if rec.orphans:
        console.print(Text(f"{len(rec.orphans)} files in trusted storage without a done job:", "bold red"))
        for o in rec.orphans[:MAX_LISTED]:
            console.print(Text(f"  {o.key}: {o.reason}"))


def _return_times(report: Report, console: Console) -> None:
    table = Table(title="Return times (from batch creation)")
    for col in ("batch", "jobs", "done", "first", "50 %", "90 %", "100 %"):
        table.add_column(col, justify="left" if col == "batch" else "right")
    for rt in report.return_times:
        table.add_row(
            Text(f"{rt.batch_id} {rt.batch_name}"),
            str(rt.jobs),
            str(rt.done),
            duration(rt.first_s),
            duration(rt.p50_s),
            duration(rt.p90_s),
            duration(rt.p100_s),
        )
    console.print(table)


def _hosts(report: Report, console: Console) -> None:
    states = list(report.hosts[0].tasks) if report.hosts else []
    table = Table(title="Success per host")
    for col in ("host", "volunteer", "platform", "cores", "quota/day", *states, "running", "success"):
        table.add_column(col, justify="left" if col in ("host", "volunteer", "platform") else "right")
    for h in report.hosts:
        table.add_row(
            Text(f"{h.host_id} {h.host_name or ''}".strip()),
            Text(h.volunteer),
            Text(h.platform),
            str(h.cores),
            f"{h.daily_quota} x {h.cores}",
            *(str(h.tasks[s]) for s in states),
            str(h.in_progress),
            percent(h.success_rate),
        )
    console.print(table)


def _outcomes(report: Report, console: Console) -> None:
    totals = Table(title="Tasks by state")
    totals.add_column("state")
    totals.add_column("tasks", justify="right")
    for state, n in report.outcomes.tasks.items():
        totals.add_row(state, str(n))
    console.print(totals)
    if not report.outcomes.reasons:
        return
    reasons = Table(title="Why tasks were invalid or failed")
    for col in ("state", "count", "reason"):
        reasons.add_column(col, justify="right" if col == "count" else "left")
    for r in report.outcomes.reasons:
        reasons.add_row(r.state, str(r.count), Text(r.reason))
    console.print(reasons)
