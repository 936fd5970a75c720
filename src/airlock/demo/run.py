"""`airlock demo`: the whole system on the embedded default (SQLite and local folders).

Starts a real gateway process on a free loopback port, submits a batch of Λb → p μ ν Monte Carlo jobs
(each writes a ROOT file), runs a pool of real agents of which some misbehave (vanish mid-task, return
corrupt or tampered output, exit non-zero, upload a file nobody asked for), shows progress, and ends with
the report: the reconciliation of job states against files in trusted storage, return times, success per
host and an HTML page with the return-time curve and the physics histogram. Every job must end done and
no tampered output may reach trusted storage; the exit code says whether that held.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from airlock.agent.sandbox import Sandbox, SandboxError
from airlock.api.process import GatewayProcess, free_port, stop_process
from airlock.config import Settings, load_settings
from airlock.context import Gateway, initialise
from airlock.credentials.keys import load_signing_keys
from airlock.credentials.tokens import TokenIssuer
from airlock.db.engine import read
from airlock.db.migrate import upgrade
from airlock.demo.boinc_clients import BoincHost, boinc_available
from airlock.operator_client import OperatorClient
from airlock.storage.xrootd_server import XRootDServer

LBMC = Path(__file__).with_name("lbmc.py")
MISBEHAVIOURS = ["vanish", "corrupt", "tamper", "fail", "extra"]
PASSWORD = "demo-volunteer-password"


@dataclass
class DemoOptions:
    jobs: int = 100
    agents: int = 8
    events: int = 2000
    work_dir: Path = Path("airlock-demo")
    keep: bool = False
    database_url: str | None = None
    timeout_s: float = 600.0
    bridge: str = "local"  # or "xrootd": a private XRootD server as quarantine and trusted storage
    boinc: int = 0  # real BOINC clients beside (or, with agents=0, instead of) the agents


def sandbox_available() -> bool:
    """Whether the agents' sandbox works here: the agent's own probe decides."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            Sandbox(Path(tmp)).probe()
        except SandboxError:
            return False
    return True


def batch_description(n_jobs: int, events: int, lbmc_sha256: str) -> dict[str, Any]:
    return {
        "name": "lambda_b-to-p-mu-nu",
        "owner": "demo-physicist",
        "defaults": {
            "app": "lbmc",
            "inputs": [{"name": "lbmc.py", "sha256": lbmc_sha256}],
            "outputs": [{"name": "events.root", "max_size": "8MB"}],
            "resources": {"cores": 1, "memory_mb": 1024, "disk_mb": 64, "runtime_s": 30},
            "copies": 2,
            "quorum": 2,
            "max_attempts": 10,
            "deadline_s": 900,
        },
        "jobs": [
            {
                "name": f"lbmc-{seed:04d}",
                "command": [
                    "python3",
                    "lbmc.py",
                    "--seed",
                    str(seed),
                    "--events",
                    str(events),
                    "--out",
                    "events.root",
                ],
                "params": {"seed": seed, "events": events},
            }
            for seed in range(1, n_jobs + 1)
        ],
    }


class Demo:
    def __init__(self, opts: DemoOptions, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.root = opts.work_dir.resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.operator_token = secrets.token_urlsafe(24)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")},
            "AIRLOCK_OPERATOR_TOKEN": self.operator_token,
            "AIRLOCK_LEASE_S": "20",  # a vanished volunteer's task is reissued after 20 s
            "AIRLOCK_HEARTBEAT_INTERVAL_S": "5",
            "AIRLOCK_LOOP_INTERVAL_S": "0.3",
            "AIRLOCK_RETRY_AFTER_S": "2",
            "AIRLOCK_QUARANTINE_RETENTION_S": "0",
            # BOINC's per-host daily quota, set so that a broken host is cut off after ~20 bad results
            # while an honest one (~50 tasks in this demo) never meets it
            "AIRLOCK_DAILY_QUOTA_PER_CORE": "30",
        }
        self.agent_env: dict[str, str] = {"AIRLOCK_PASSWORD": PASSWORD}
        if opts.database_url:
            self.env["AIRLOCK_DATABASE_URL"] = opts.database_url
        self.server: GatewayProcess | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self.boinc_hosts: list[BoincHost] = []
        self.storage: XRootDServer | None = None
        if opts.boinc:
            self.env["AIRLOCK_BOINC_NEXT_RPC_DELAY_S"] = "5"

    # ------------------------------------------------------------------------------------------ steps
    def prepare(self) -> Gateway:
        if self.root.exists() and not self.opts.keep:
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        settings = load_settings(
            data_dir=self.root / "gateway",
            database_url=self.opts.database_url,
            operator_token=self.operator_token,
            public_url=self.url,
            bind_port=self.port,
        )
        initialise(settings)
        if self.opts.bridge == "xrootd":
            settings = self.start_storage(settings)
        if self.opts.boinc:
            self.sign_wrapper(settings)
        gw = Gateway.open(settings)
        upgrade(gw.engine)
        return gw

    def start_storage(self, settings: Settings) -> Settings:
        """A private XRootD trusting the gateway's token issuer; volunteers upload to it directly."""
        issuer = TokenIssuer(settings.token_issuer, load_signing_keys(settings.keys_dir))
        port = free_port()
        url = f"https://localhost:{port}"
        self.storage = XRootDServer(issuer.issuer, issuer.jwks(), [issuer.audience, url], port=port).start()
        ca = str(self.storage.pki.ca_file)
        self.env.update(AIRLOCK_BRIDGE="xrootd", AIRLOCK_STORAGE_URL=url, AIRLOCK_STORAGE_CA_FILE=ca)
        self.agent_env["SSL_CERT_FILE"] = ca  # the agents trust the storage's (test) CA
        return settings.model_copy(
            update={"bridge": "xrootd", "storage_url": url, "storage_ca_file": self.storage.pki.ca_file}
        )

    def start_server(self) -> None:
        self.server = GatewayProcess(
            self.root / "gateway", self.env, self.root / "logs" / "gateway.log", port=self.port
        ).start()

    def sign_wrapper(self, settings: Settings) -> None:
        """The BOINC app, signed with a throw-away key kept outside the gateway's data folder."""
        from airlock.boinc.apps import sign_app, wrapper_path
        from airlock.boinc.signing import generate_key, private_pem
        from airlock.credentials.keys import write_private

        key = self.root / "offline-keys" / "code_sign_private.pem"
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(key, private_pem(generate_key()))
        sign_app(key, settings.data_dir, settings.boinc_app, 100, [wrapper_path()])

    def start_boinc(self, client: OperatorClient) -> list[tuple[str, str]]:
        """N headless BOINC clients, each a volunteer attached with the key lookup_account gives it."""
        url = f"{self.url}/boinc/"
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        pool = []
        for i in range(1, self.opts.boinc + 1):
            name = f"boinc-{i:02d}"
            email = f"{name}@demo.example"
            client.add_volunteer(name, PASSWORD, email)
            host = BoincHost(self.root / "boinc" / name, ncpus=1, env=env).start()
            self.boinc_hosts.append(host)
            host.attach(url, host.lookup_account(url, email, PASSWORD))
            pool.append((name, "honest (BOINC client)"))
        return pool

    def poke_boinc(self) -> None:
        """`boinccmd --project URL update`: ask each client for a scheduler RPC now."""
        for host in self.boinc_hosts:
            host.update(f"{self.url}/boinc/")

    def start_agents(self, client: OperatorClient, sandboxed: bool) -> list[tuple[str, str]]:
        if self.opts.agents <= 0:
            return []
        honest = max(3, self.opts.agents - len(MISBEHAVIOURS))
        roles = ["honest"] * honest + MISBEHAVIOURS[: max(0, self.opts.agents - honest)]
        pool = []
        for i, role in enumerate(roles, 1):
            name = f"{role}-{i:02d}"
            client.add_volunteer(name, PASSWORD)
            cmd = [
                sys.executable,
                "-m",
                "airlock",
                "agent",
                "--server",
                self.url,
                "--user",
                name,
                "--slots",
                "1",
                "--work-dir",
                str(self.root / "agents" / name),
                "--poll-max",
                "2",
                "--host-name",
                name,
            ]
            if not sandboxed:
                cmd.append("--no-sandbox")
            if role != "honest":
                cmd += ["--misbehave", role]
            log = (self.root / "logs" / f"agent-{name}.log").open("wb")
            self.agents.append(
                subprocess.Popen(
                    cmd, env={**self.env, **self.agent_env}, stdout=log, stderr=subprocess.STDOUT
                )
            )
            pool.append((name, role))
        return pool

    def wait(self, client: OperatorClient, batch_id: int, total: int) -> dict[str, int]:
        states: dict[str, int] = {}
        final = ("done", "failed", "cancelled")
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[states]}"),
            console=self.console,
            transient=False,
        ) as progress:
            bar = progress.add_task("jobs done", total=total, states="")
            deadline = time.monotonic() + self.opts.timeout_s
            next_check = next_poke = time.monotonic()
            while time.monotonic() < deadline:
                if self.boinc_hosts and time.monotonic() > next_poke:
                    next_poke = time.monotonic() + 5
                    self.poke_boinc()
                states = client.call("GET", f"/api/v1/batches/{batch_id}")["jobs_by_state"]
                summary = "  ".join(f"{k} {v}" for k, v in sorted(states.items()))
                progress.update(bar, completed=states.get("done", 0), states=summary)
                if sum(states.get(s, 0) for s in final) >= total:
                    break
                if self.storage is not None and time.monotonic() > next_check:
                    next_check = time.monotonic() + 5
                    if self.storage.revive():
                        self.console.print("[yellow]XRootD stopped answering and was restarted[/yellow]")
                time.sleep(0.5)
        return states

    def stop(self) -> None:
        for host in self.boinc_hosts:
            host.stop()
        for p in self.agents:  # SIGTERM them all first, so they stop together
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.agents:
            stop_process(p, timeout=15)
        if self.server is not None:
            self.server.stop()

    def stop_storage(self) -> None:
        if self.storage is not None:
            self.storage.stop()


def run_demo(opts: DemoOptions) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=140)
    if opts.boinc and (why := boinc_available()):
        console.print(f"[red]--boinc: {why}[/]")
        return 2
    if opts.agents <= 0 and opts.boinc <= 0:
        console.print("[red]nobody to run the jobs: give --agents or --boinc[/]")
        return 2
    demo = Demo(opts, console)
    started = time.monotonic()
    try:
        gw = demo.prepare()
        return _run(demo, gw, opts, console, started)
    finally:
        demo.stop_storage()


def _run(demo: Demo, gw: Gateway, opts: DemoOptions, console: Console, started: float) -> int:
    sandboxed = sandbox_available()
    if not sandboxed:
        console.print(
            "[yellow]bubblewrap is not usable here: the demo's agents run with --no-sandbox "
            "(install the Debian package bubblewrap for the real thing)[/yellow]"
        )
    try:
        demo.start_server()
        console.print(f"gateway on {demo.url}  (data: {demo.root / 'gateway'}, logs: {demo.root / 'logs'})")
        if demo.storage is not None:
            console.print(f"XRootD data bridge and trusted storage on {demo.storage.url}")
        with OperatorClient(demo.url, demo.operator_token) as client:
            lbmc = client.upload_input(LBMC.read_bytes())
            batch = client.submit(batch_description(opts.jobs, opts.events, lbmc["sha256"]))
            console.print(f"submitted batch {batch['batch_id']}: {opts.jobs} jobs × 2 copies, quorum 2")
            pool = demo.start_agents(client, sandboxed)
            if pool:
                console.print("agents: " + ", ".join(f"{n}" for n, _ in pool))
            if opts.boinc:
                boinc = demo.start_boinc(client)
                console.print(
                    f"BOINC clients attached to {demo.url}/boinc/: " + ", ".join(n for n, _ in boinc)
                )
            states = demo.wait(client, batch["batch_id"], opts.jobs)
    finally:
        demo.stop()
    elapsed = time.monotonic() - started
    return conclude(gw, demo, batch["batch_id"], opts, states, elapsed, console)


def conclude(
    gw: Gateway,
    demo: Demo,
    batch_id: int,
    opts: DemoOptions,
    states: dict[str, int],
    elapsed: float,
    console: Console,
) -> int:
    from airlock.demo.verify import untampered
    from airlock.reporter.report import build_report, render_console, write_html

    with read(gw.engine) as conn:
        report = build_report(conn, gw.trusted, batch_id=batch_id)
    render_console(report, console)
    html = demo.root / "report.html"
    write_html(report, html, trusted=gw.trusted)
    checked, bad = untampered(gw, batch_id)
    done = states.get("done", 0)
    console.print(
        f"\njobs done: {done}/{opts.jobs}   outputs re-derived and compared: {checked}, "
        f"tampered or wrong in trusted storage: {len(bad)}   wall time: {elapsed:.0f} s"
    )
    console.print(f"HTML report: {html}")
    gw.close()
    ok = done == opts.jobs and not bad
    if not ok:
        console.print(f"[red]demo FAILED[/red]: states {states}; bad outputs {bad[:5]}")
    return 0 if ok else 1
