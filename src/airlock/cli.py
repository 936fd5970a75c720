"""The `airlock` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from airlock import __version__

if TYPE_CHECKING:
    from airlock.reporter.upstream import UpstreamDrift

console = Console()


def _settings(ns: argparse.Namespace) -> Any:
    from airlock.config import load_settings

    overrides = {
        "data_dir": getattr(ns, "data_dir", None),
        "database_url": getattr(ns, "database_url", None),
        "bind_host": getattr(ns, "host", None),
        "bind_port": getattr(ns, "port", None),
        "workers": getattr(ns, "workers", None),
        "public_url": getattr(ns, "public_url", None),
    }
    if getattr(ns, "no_background", False):
        overrides["background"] = False
    return load_settings(getattr(ns, "config", None), **overrides)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("AIRLOCK_SERVER", "http://127.0.0.1:8080"),
        help="gateway URL (env AIRLOCK_SERVER)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("AIRLOCK_OPERATOR_TOKEN"),
        help="operator token (env AIRLOCK_OPERATOR_TOKEN; else read from --data-dir)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="where `airlock init` put the operator token")


def _client(ns: argparse.Namespace) -> Any:
    from airlock.context import resolve_operator_token
    from airlock.operator_client import OperatorClient

    token = ns.token or resolve_operator_token(_settings(ns))
    return OperatorClient(ns.server, token)


# ------------------------------------------------------------------------------------------- commands


def cmd_init(ns: argparse.Namespace) -> int:
    from airlock.context import initialise
    from airlock.db.engine import make_engine
    from airlock.db.migrate import upgrade

    settings = _settings(ns)
    created = initialise(settings)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    engine.dispose()
    for path in created:
        console.print(f"created {path}")
    console.print(
        f"database ready: {settings.db_url if settings.database_url is None else '(AIRLOCK_DATABASE_URL)'}"
    )
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from airlock.api.server import serve
    from airlock.context import initialise

    settings = _settings(ns)
    initialise(settings)
    serve(settings, log_level=ns.log_level)
    return 0


def cmd_worker(ns: argparse.Namespace) -> int:
    from airlock.context import Gateway
    from airlock.db.migrate import upgrade
    from airlock.service import BackgroundLoops

    gw = Gateway.open(_settings(ns), serving=False)
    upgrade(gw.engine)
    loops = BackgroundLoops(gw)
    if ns.once:
        console.print(f"{loops.run_once()} items processed")
        return 0
    loops.start()
    try:
        for loop in loops.loops:
            if loop.thread is not None:
                loop.thread.join()
    except KeyboardInterrupt:
        loops.stop()
    return 0


def cmd_db(ns: argparse.Namespace) -> int:
    from airlock.db.engine import make_engine
    from airlock.db.migrate import current_revision, upgrade

    engine = make_engine(_settings(ns).db_url)
    if ns.action == "upgrade":
        upgrade(engine)
    console.print(f"schema revision: {current_revision(engine)}")
    return 0


def cmd_submit(ns: argparse.Namespace) -> int:
    from airlock.operator_client import load_description

    doc = load_description(ns.file)
    with _client(ns) as client:
        result = client.submit(doc, ns.file.parent)
    console.print(f"batch {result['batch_id']}: {len(result['jobs'])} jobs submitted")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    if ns.upstream:
        return _status_upstream(ns)
    with _client(ns) as client:
        if ns.job is not None:
            console.print_json(json.dumps(client.call("GET", f"/api/v1/jobs/{ns.job}")))
            return 0
        batches = client.call("GET", "/api/v1/batches")
    table = Table(title="batches")
    for col in ("id", "name", "owner", "upstream", "jobs by state"):
        table.add_column(col)
    for b in batches:
        if ns.batch is not None and b["id"] != ns.batch:
            continue
        states = ", ".join(f"{k} {v}" for k, v in sorted(b["jobs_by_state"].items()))
        table.add_row(str(b["id"]), b["name"], b["owner"] or "", b["upstream"], states)
    console.print(table)
    return 0


def _status_upstream(ns: argparse.Namespace) -> int:
    """Upstream (DIRAC) jobs next to their Airlock jobs, from the gateway's database; --live also asks
    DIRAC for each job's current status and reconciles (exit 1 on drift: a job Done upstream without
    its files, files handed back for a job not Done upstream)."""
    from airlock.db.engine import make_engine, read
    from airlock.reporter.upstream import reconcile_upstream, upstream_jobs

    settings = _settings(ns)
    engine = make_engine(settings.db_url)
    try:
        with read(engine) as conn:
            rows = upstream_jobs(conn)
    finally:
        engine.dispose()
    live: dict[str, str] = {}
    drift = None
    if ns.live and settings.upstream == "dirac":
        from airlock.upstream.base import UpstreamError
        from airlock.upstream.dirac import DiracUpstream

        try:
            dirac = DiracUpstream(settings)
        except UpstreamError as exc:
            console.print(f"cannot ask DIRAC: {exc}")
            return 1
        try:
            for r in rows:
                try:
                    st, minor = dirac.job_state(r["ref"])
                    live[r["ref"]] = f"{st} ({minor})" if minor else str(st)
                except UpstreamError as exc:
                    live[r["ref"]] = f"? {exc}"[:60]
            engine = make_engine(settings.db_url)
            try:
                with read(engine) as conn:
                    drift = reconcile_upstream(conn, dirac.name, dirac)
            finally:
                engine.dispose()
        finally:
            dirac.close()
    table = Table(title="upstream jobs")
    cols = [
        "upstream",
        "id",
        "try",
        "gateway",
        "upstream status (last reported)",
        "airlock job",
        "state",
        "tasks",
    ]
    if live:
        cols.insert(5, "upstream status (now)")
    for col in [*cols, "last error"]:
        table.add_column(col)
    for r in rows:
        reported = f"{r['reported_status']} ({r['reported_minor']})" if r["reported_status"] else ""
        cells = [
            r["upstream"],
            r["ref"],
            str(r["attempt"]),
            r["state"],
            reported,
            "" if r["job_id"] is None else str(r["job_id"]),
            r["job_state"] or "",
            str(r["tasks"] or 0),
        ]
        if live:
            cells.insert(5, live.get(r["ref"], ""))
        table.add_row(*cells, (r["error"] or "")[:80])
    console.print(table)
    if drift is not None:
        _print_upstream_drift(drift)
        return 1 if drift.drift else 0
    return 0


def _print_upstream_drift(drift: UpstreamDrift) -> None:
    if not drift.drift:
        console.print("[green]no drift: every job Done upstream has its files, every file a Done job[/]")
    for title, items in (
        ("Done upstream without its files", drift.done_without_files),
        ("files handed back for a job not Done upstream", drift.files_without_done),
        ("could not ask the upstream", drift.unreachable),
    ):
        if items:
            console.print(f"[red]{title} ({len(items)}):[/]")
            for item in items[:50]:
                console.print(f"  {item}")


def cmd_cancel(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        if ns.batch:
            result = client.call("POST", f"/api/v1/batches/{ns.id}/cancel")
            console.print(f"{result['cancelled']} jobs cancelled")
        else:
            job = client.call("POST", f"/api/v1/jobs/{ns.id}/cancel")
            console.print(f"job {job['id']}: {job['state']}")
    return 0


def cmd_volunteer(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        if ns.action == "add":
            password = ns.password or os.environ.get("AIRLOCK_VOLUNTEER_PASSWORD")
            if not password:
                console.print("give --password or AIRLOCK_VOLUNTEER_PASSWORD")
                return 2
            v = client.add_volunteer(ns.name, password, ns.email)
            console.print(f"volunteer {v['id']} ({v['name']}) registered")
        elif ns.action in ("block", "unblock"):
            client.call("POST", f"/api/v1/volunteers/{ns.name}/{ns.action}")
            console.print(f"volunteer {ns.name} {ns.action}ed")
        else:
            table = Table(title="volunteers")
            for col in ("id", "name", "state", "hosts", "registered"):
                table.add_column(col)
            for v in client.call("GET", "/api/v1/volunteers"):
                table.add_row(str(v["id"]), v["name"], v["state"], str(v["hosts"]), v["created_at"][:19])
            console.print(table)
    return 0


def cmd_hosts(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        hosts = client.call("GET", "/api/v1/hosts")
    table = Table(title="hosts")
    for col in (
        "id",
        "volunteer",
        "platform",
        "cores",
        "memory MB",
        "quota/core",
        "today",
        "valid",
        "invalid",
        "error",
        "lost",
    ):
        table.add_column(col)
    for h in hosts:
        table.add_row(
            *(
                str(h[k])
                for k in (
                    "id",
                    "volunteer_id",
                    "platform",
                    "cores",
                    "memory_mb",
                    "daily_quota",
                    "dispatched_today",
                    "n_valid",
                    "n_invalid",
                    "n_error",
                    "n_lost",
                )
            )
        )
    console.print(table)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from airlock.context import Gateway
    from airlock.db.engine import read
    from airlock.reporter.report import build_report, render_console, write_html

    gw = Gateway.open(_settings(ns), serving=False)
    with read(gw.engine) as conn:
        report = build_report(conn, gw.trusted, batch_id=ns.batch)
    render_console(report, console)
    if ns.html:
        write_html(report, ns.html, trusted=gw.trusted)
        console.print(f"HTML report: {ns.html}")
    return 0


def cmd_agent(ns: argparse.Namespace) -> int:
    from airlock.agent.main import options_from_args, run_agent

    return int(run_agent(options_from_args(ns)))


def cmd_demo(ns: argparse.Namespace) -> int:
    from airlock.demo.run import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            jobs=ns.jobs,
            agents=ns.agents,
            work_dir=ns.work_dir,
            keep=ns.keep,
            events=ns.events,
            database_url=ns.database_url,
            bridge=ns.bridge,
            boinc=ns.boinc,
        )
    )


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock",
        description="Airlock: a gateway that runs an experiment's batch jobs on untrusted volunteer "
        "computers.",
    )
    parser.add_argument("--version", action="version", version=f"airlock {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def gateway_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML configuration file (env AIRLOCK_CONFIG)")
        p.add_argument("--data-dir", type=Path, help="keys, SQLite database and local storage")
        p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql://user@host/db")

    p = sub.add_parser("init", help="create the data folder, signing key, operator token and database")
    gateway_args(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the gateway (HTTP API, data bridge and background loops)")
    gateway_args(p)
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8080)")
    p.add_argument("--workers", type=int, help="HTTP server processes (default 1)")
    p.add_argument("--public-url", help="URL volunteers reach this gateway at")
    p.add_argument("--no-background", action="store_true", help="do not run validator/assimilator loops here")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker", help="run only the background loops (expiry, validator, assimilator, janitor)"
    )
    gateway_args(p)
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("db", help="database schema migrations")
    gateway_args(p)
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("submit", help="submit a batch from a YAML or JSON job description")
    _server_args(p)
    p.add_argument("file", type=Path, help="job description (YAML or JSON); `path:` inputs are uploaded")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="batches and their jobs by state, or one job in full")
    _server_args(p)
    p.add_argument("--batch", type=int, help="only this batch")
    p.add_argument("--job", type=int, help="one job in full: tasks, volunteers, hosts, files")
    p.add_argument(
        "--upstream",
        action="store_true",
        help="upstream (DIRAC) jobs next to their Airlock jobs, read from the gateway's database",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="with --upstream: also ask DIRAC for each job's status and flag drift (exit 1)",
    )
    p.add_argument(
        "--config", type=Path, help="with --upstream: TOML configuration file (env AIRLOCK_CONFIG)"
    )
    p.add_argument("--database-url", help="with --upstream: the gateway's database")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job (or with --batch, a whole batch)")
    _server_args(p)
    p.add_argument("id", type=int, help="job id (batch id with --batch)")
    p.add_argument("--batch", action="store_true", help="cancel every unfinished job of batch ID")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("volunteer", help="register, block, unblock or list volunteers")
    _server_args(p)
    p.add_argument("action", choices=["add", "block", "unblock", "list"])
    p.add_argument("name", nargs="?", help="name (add) or id (block, unblock)")
    p.add_argument("--password", help="for add (or env AIRLOCK_VOLUNTEER_PASSWORD)")
    p.add_argument("--email", help="for add: the volunteer's e-mail address")
    p.set_defaults(func=cmd_volunteer)

    p = sub.add_parser("hosts", help="volunteer hosts with their record and quota")
    _server_args(p)
    p.set_defaults(func=cmd_hosts)

    p = sub.add_parser("report", help="reconciliation, return times and success per host (from the database)")
    gateway_args(p)
    p.add_argument("--batch", type=int, help="only this batch")
    p.add_argument("--html", type=Path, help="also write an HTML report here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("agent", help="the volunteer agent: pull tasks, run them sandboxed, upload, report")
    from airlock.agent.main import add_agent_arguments

    add_agent_arguments(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("demo", help="the whole system on the embedded default, with misbehaving volunteers")
    p.add_argument("--jobs", type=int, default=100, help="jobs in the batch (default 100)")
    p.add_argument("--agents", type=int, default=8, help="agents, some of which misbehave (0: none)")
    p.add_argument(
        "--boinc",
        type=int,
        default=0,
        metavar="N",
        help="also run N real BOINC clients (Debian's boinc-client) attached to the gateway's BOINC project",
    )
    p.add_argument("--events", type=int, default=2000, help="Monte Carlo events per job")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("airlock-demo"),
        help="data, agents and report.html (./airlock-demo)",
    )
    p.add_argument("--database-url", help="run the demo on this database instead of SQLite")
    p.add_argument("--keep", action="store_true", help="keep the work dir of an earlier run")
    p.add_argument(
        "--bridge",
        choices=["local", "xrootd"],
        default="local",
        help="xrootd: a private XRootD server (run as the xrootd user) as data bridge and trusted storage",
    )
    p.set_defaults(func=cmd_demo)

    from airlock.credentials.commands import add_commands

    add_commands(sub, gateway_args)

    from airlock.boinc.commands import add_commands as add_boinc_commands

    add_boinc_commands(sub, gateway_args)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not ns.verbose:  # per-request and per-migration lines are noise for an operator
        for noisy in ("httpx", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from airlock.core.errors import AirlockError
    from airlock.operator_client import OperatorError

    try:
        sys.exit(ns.func(ns))
    except (AirlockError, OperatorError) as exc:
        console.print(f"[red]error:[/red] {getattr(exc, 'message', exc)}")
        sys.exit(1)
