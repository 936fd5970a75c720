"""The report as one self-contained HTML page: inline CSS, plots as base64 PNGs, no scripts, no links.
Every string is escaped: host names, volunteer names and verdicts come from untrusted volunteers."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from airlock.reporter.console import duration, percent
from airlock.reporter.model import Report
from airlock.reporter.plots import mass_png, read_masses, return_time_png
from airlock.storage.base import Storage

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; } .ok { color: #176b1c; } .drift { color: #b00020; font-weight: bold; }
img { max-width: 100%; } .note { color: #666; }
"""

Cell = str | int | float | None


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, total: Sequence[Cell] | None = None
) -> str:
    def row(cells: Sequence[Cell], cls: str = "") -> str:
        tds = "".join(
            f'<td class="n">{_e(c)}</td>'
            if isinstance(c, int | float)
            else f"<td>{_e('' if c is None else c)}</td>"
            for c in cells
        )
        return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"

    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(row(r) for r in rows) + (row(total, "total") if total is not None else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">{_e(alt)}: nothing to plot.</p>'
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _reconciliation(report: Report) -> str:
    rec = report.reconciliation
    rows = [(r.state, r.jobs, r.jobs_with_all_outputs, r.files_found) for r in rec.rows]
    total = (
        "total",
        sum(r.jobs for r in rec.rows),
        sum(r.jobs_with_all_outputs for r in rec.rows),
        sum(r.files_found for r in rec.rows),
    )
    parts = [
        "<h2>Jobs against files in trusted storage</h2>",
        _table(["job state", "jobs", "with all outputs", "files found"], rows, total=total),
        f"<p>{rec.files_recorded} trusted files recorded, {rec.files_in_storage} in trusted storage.</p>",
    ]
    if not rec.drift:
        parts.append(
            '<p class="ok">No drift: every done job has its outputs, every stored file a done job.</p>'
        )
    if rec.done_missing:
        parts.append(f'<p class="drift">{len(rec.done_missing)} outputs of done jobs are missing:</p>')
        parts.append(
            _table(
                ["job", "name", "output", "key"],
                [(m.job_id, m.job_name, m.name, m.key or "(never recorded)") for m in rec.done_missing],
            )
        )
    if rec.orphans:
        parts.append(f'<p class="drift">{len(rec.orphans)} files in trusted storage without a done job:</p>')
        parts.append(_table(["key", "reason"], [(o.key, o.reason) for o in rec.orphans]))
    return "\n".join(parts)


def _return_times(report: Report) -> str:
    rows = [
        (
            f"{rt.batch_id} {rt.batch_name}",
            rt.jobs,
            rt.done,
            duration(rt.first_s),
            duration(rt.p50_s),
            duration(rt.p90_s),
            duration(rt.p100_s),
        )
        for rt in report.return_times
    ]
    return "\n".join(
        [
            "<h2>Return times</h2>",
            _table(["batch", "jobs", "done", "first", "50 %", "90 %", "100 %"], rows),
            _img(return_time_png(report.return_times), "fraction of results returned vs time"),
        ]
    )


def _hosts(report: Report) -> str:
    states = list(report.hosts[0].tasks) if report.hosts else []
    rows: list[list[Cell]] = [
        [
            f"{h.host_id} {h.host_name or ''}".strip(),
            h.volunteer,
            h.platform,
            h.cores,
            f"{h.daily_quota} x {h.cores}",
            *(h.tasks[s] for s in states),
            h.in_progress,
            percent(h.success_rate),
        ]
        for h in report.hosts
    ]
    headers = ["host", "volunteer", "platform", "cores", "quota/day", *states, "running", "success"]
    return "<h2>Success per host</h2>\n" + _table(headers, rows)


def _outcomes(report: Report) -> str:
    parts = [
        "<h2>Task outcomes</h2>",
        _table(["state", "tasks"], list(report.outcomes.tasks.items())),
    ]
    if report.outcomes.reasons:
        parts.append("<h3>Why tasks were invalid or failed</h3>")
        parts.append(
            _table(
                ["state", "count", "reason"], [(r.state, r.count, r.reason) for r in report.outcomes.reasons]
            )
        )
    return "\n".join(parts)


def _physics(report: Report, trusted: Storage) -> str:
    if not report.physics_files:
        return ""
    sample = read_masses(trusted, report.physics_files)
    parts = [
        "<h2>Physics: &Lambda;<sub>b</sub> &rarr; p &mu; &nu;</h2>",
        f"<p>{sample.masses_mev.size} accepted of {sample.events} generated decays "
        f"in {sample.files_read} trusted files.</p>",
        _img(mass_png(sample), "reconstructed p+μ invariant mass"),
    ]
    if sample.unreadable:
        parts.append(f'<p class="drift">{len(sample.unreadable)} files could not be read:</p>')
        parts.append(_table(["key"], [(k,) for k in sample.unreadable]))
    return "\n".join(parts)


def render_html(report: Report, *, trusted: Storage) -> str:
    scope = "all batches" if report.batch_id is None else f"batch {report.batch_id}"
    title = f"Airlock report — {scope}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="note">generated {_e(report.generated_at.isoformat(timespec="seconds"))}</p>',
            _reconciliation(report),
            _return_times(report),
            _hosts(report),
            _outcomes(report),
            _physics(report, trusted),
            "</body></html>",
        ]
    )


def write_html(report: Report, path: Path | str, *, trusted: Storage) -> None:
    """Write the page atomically (a temporary file renamed over `path`)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_html(report, trusted=trusted), encoding="utf-8")
    tmp.replace(target)
