"""`airlock agent`: the volunteer-side agent of the vacuum model — it pulls tasks from the server.

The agent logs in, registers its host once (the host id is remembered in `<work dir>/agent-state.json`),
then keeps `--slots` task runners busy: it asks for work (`POST /api/v1/work`) whenever a slot is free,
runs each task in the sandbox (see `airlock.agent.sandbox`), and sleeps the server's `retry_after_s`
(capped by `--poll-max`, with jitter) when there is none.

`--once` exits when the server has no more work and nothing runs; `--idle-exit S` after S seconds without
work; `--max-tasks N` after N tasks. SIGINT/SIGTERM: the first stops taking work and lets running tasks
finish, the second kills them (their leases expire on the server) and exits.

`--misbehave MODE` (hidden from --help) is fault injection for the demo and the tests; the modes are
described in `airlock.agent.faults`.

Exit codes: 0 done, 1 unexpected error, 2 login refused or volunteer blocked, 3 no usable sandbox.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from airlock.agent import host as hostinfo
from airlock.agent.client import ApiError, Blocked, Cancelled, LoginFailed, ServerClient
from airlock.agent.faults import MODES, behaviour
from airlock.agent.proxy import ProxyKeeper, add_proxy_arguments, basic_auth
from airlock.agent.runner import Outcome, TaskContext, TaskRunner
from airlock.agent.sandbox import Sandbox, SandboxError
from airlock.core.schemas import TaskAssignment, WorkRequest

log = logging.getLogger("airlock.agent")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_NO_SANDBOX = 0, 1, 2, 3


@dataclass
class AgentOptions:
    """Everything `airlock agent` takes on its command line."""

    server: str
    user: str
    password: str
    slots: int = 1
    work_dir: Path = Path("airlock-agent")
    no_sandbox: bool = False
    once: bool = False
    idle_exit_s: float | None = None
    max_tasks: int | None = None
    misbehave: str | None = None
    poll_max_s: float = 60.0
    host_name: str | None = None
    timeout_s: float = 30.0
    install_signal_handlers: bool = True
    proxy_file: Path | None = None
    proxy_lifetime_s: int = 12 * 3600
    token_file: Path | None = None  # log in with this access token instead of user and password

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"AgentOptions(server={self.server!r}, user={self.user!r}, slots={self.slots}, ...)"


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the agent's options to a (sub)parser."""
    parser.add_argument("--server", required=True, help="the Airlock server's base URL")
    parser.add_argument("--user", default=None, help="volunteer name (not with --token-file)")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="use the access token in this file instead of logging in (a BOINC vacuum pilot's); "
        "re-read when the server refuses it",
    )
    parser.add_argument(
        "--password",
        default=None,
        help="volunteer password (visible to other local users in the process list: prefer "
        "--password-file or the AIRLOCK_PASSWORD environment variable)",
    )
    parser.add_argument("--password-file", type=Path, default=None, help="read the password from this file")
    parser.add_argument("--slots", type=int, default=1, help="tasks run at once (default 1)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("airlock-agent"),
        help="where tasks run (default ./airlock-agent)",
    )
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run payloads WITHOUT bubblewrap (unsafe: trusted work only)",
    )
    parser.add_argument("--once", action="store_true", help="exit when the server has no more work")
    parser.add_argument(
        "--idle-exit", type=float, default=None, metavar="S", help="exit after S s without work"
    )
    parser.add_argument("--max-tasks", type=int, default=None, metavar="N", help="exit after N tasks")
    parser.add_argument(
        "--poll-max", type=float, default=60.0, metavar="S", help="longest wait between work requests (60)"
    )
    parser.add_argument("--host-name", default=None, help="name of this host shown to the operator")
    parser.add_argument("--misbehave", choices=MODES, default=None, help=argparse.SUPPRESS)
    add_proxy_arguments(parser)


def _password(ns: argparse.Namespace) -> str:
    if ns.password_file is not None:
        return str(ns.password_file.read_text().strip())
    if ns.password:
        return str(ns.password)
    env = os.environ.get("AIRLOCK_PASSWORD")
    if env:
        return env
    raise SystemExit("airlock agent: give --password-file, AIRLOCK_PASSWORD or --password")


def options_from_args(ns: argparse.Namespace) -> AgentOptions:
    if ns.token_file is not None:
        if ns.proxy_file is not None:
            raise SystemExit("airlock agent: --proxy-file needs --user and a password, not --token-file")
        user, password = ns.user or "(token)", ""
    elif ns.user is None:
        raise SystemExit("airlock agent: give --user (with a password) or --token-file")
    else:
        user, password = ns.user, _password(ns)
    return AgentOptions(
        server=ns.server,
        user=user,
        password=password,
        token_file=ns.token_file,
        slots=ns.slots,
        work_dir=ns.work_dir,
        no_sandbox=ns.no_sandbox,
        once=ns.once,
        idle_exit_s=ns.idle_exit,
        max_tasks=ns.max_tasks,
        misbehave=ns.misbehave,
        poll_max_s=ns.poll_max,
        host_name=ns.host_name,
        proxy_file=ns.proxy_file,
        proxy_lifetime_s=ns.proxy_lifetime,
    )


def run_agent(opts: AgentOptions) -> int:
    """Run the agent until it is told to stop or runs out of work; returns the process exit code."""
    if opts.slots < 1 or opts.slots > 64:
        log.error("--slots must be between 1 and 64")
        return EXIT_ERROR
    work_dir = opts.work_dir.resolve()
    (work_dir / "tasks").mkdir(parents=True, exist_ok=True)
    sandbox = Sandbox(work_dir, enabled=not opts.no_sandbox)
    if opts.no_sandbox:
        log.warning("!" * 78)
        log.warning("!! --no-sandbox: payloads run UNCONFINED, with your user's access to this machine !!")
        log.warning("!! use it only for work you trust                                                 !!")
        log.warning("!" * 78)
    else:
        try:
            sandbox.probe()
        except SandboxError as exc:
            log.error("%s", exc)
            log.error("refusing to run untrusted payloads without a sandbox (see --no-sandbox)")
            return EXIT_NO_SANDBOX
    agent = Agent(opts, sandbox, work_dir)
    try:
        return agent.run()
    finally:
        agent.client.close()


class Agent:
    """The main loop: asks for work while slots are free, starts a runner thread per task."""

    def __init__(
        self, opts: AgentOptions, sandbox: Sandbox, work_dir: Path, client: ServerClient | None = None
    ) -> None:
        self.opts = opts
        self.sandbox = sandbox
        self.work_dir = work_dir
        self.kill = threading.Event()  # hard stop: abort every task
        self.drain = threading.Event()  # soft stop: take no more work
        self.wake = threading.Event()  # a task finished
        self.client = client or ServerClient(
            opts.server,
            opts.user,
            opts.password,
            timeout=opts.timeout_s,
            stop=self.kill,
            token_file=opts.token_file,
        )
        self.behaviour = behaviour(opts.misbehave)
        self.running: dict[int, tuple[TaskRunner, threading.Thread]] = {}
        self.outcomes: collections.Counter[Outcome] = collections.Counter()
        self.lock = threading.Lock()
        self.taken = 0
        self.started = time.monotonic()

    # ---------------------------------------------------------------------------------------- setup

    def _host_id(self) -> int:
        o = self.opts
        known = hostinfo.load_host_id(self.work_dir, o.server, o.user)
        if known is not None:
            log.info("host %d (from %s)", known, hostinfo.STATE_FILE)
            return known
        return self._register()

    def _register(self) -> int:
        o = self.opts
        reg = hostinfo.registration(self.work_dir, o.host_name)
        got = self.client.register_host(reg)
        hostinfo.save_host_id(self.work_dir, o.server, o.user, got.host_id)
        log.info(
            "registered host %d: %s, %d cores, %d MiB, %d MiB disk (daily quota %d)",
            got.host_id, reg.platform, reg.cores, reg.memory_mb, reg.disk_mb, got.daily_quota,
        )  # fmt: skip
        return got.host_id

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.drain.is_set():
            log.warning("signal %d: taking no more work; again to abort running tasks", signum)
            self.drain.set()
        else:
            log.warning("signal %d: aborting running tasks", signum)
            self.kill.set()
        self.wake.set()

    # ----------------------------------------------------------------------------------------- loop

    def run(self) -> int:
        previous: dict[int, signal._HANDLER] = {}
        if self.opts.install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._signal)
        try:
            self.client.login()
            if (proxy_file := self.opts.proxy_file) is not None:
                auth = basic_auth(self.opts.user, self.opts.password)
                ProxyKeeper(self.client.http, auth, proxy_file, self.opts.proxy_lifetime_s, self.kill).start()
            host_id = self._host_id()
            ctx = TaskContext(self.client, self.sandbox, host_id, self.work_dir / "tasks", self.behaviour)
            return self._loop(ctx)
        except (LoginFailed, Blocked) as exc:
            self.kill.set()
            what = "volunteer is BLOCKED by the server" if isinstance(exc, Blocked) else "login refused"
            log.error("%s: %s", what, exc.message)
            return EXIT_REFUSED
        except ApiError as exc:
            self.kill.set()
            log.error("server refused: %s", exc)
            return EXIT_ERROR
        except Cancelled:
            return EXIT_OK
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._summary()

    def _loop(self, ctx: TaskContext) -> int:
        o = self.opts
        idle_since: float | None = None
        nothing_left = False
        while True:
            # Clear before looking, so a task that finishes from here on wakes the wait below.
            self.wake.clear()
            status = self._reap()
            if status is not None:
                return status
            if self.kill.is_set():
                return EXIT_OK
            with self.lock:
                n_running = len(self.running)
            quota_left = None if o.max_tasks is None else o.max_tasks - self.taken
            can_take = not self.drain.is_set() and not nothing_left and (quota_left is None or quota_left > 0)
            if not can_take and n_running == 0:
                return EXIT_OK
            free = o.slots - n_running
            if quota_left is not None:
                free = min(free, quota_left)
            wait: float | None = None  # None: until a task finishes
            if can_take and free > 0:
                try:
                    reply = self.client.request_work(self._work_request(ctx.host_id, free))
                except ApiError as exc:
                    if isinstance(exc, Blocked) or exc.status != 404:
                        raise
                    log.warning("the server does not know host %d: registering again", ctx.host_id)
                    ctx.host_id = self._register()
                    continue
                for task in reply.tasks:
                    self._start(ctx, task)
                if reply.tasks:
                    idle_since = None
                    # all free slots filled: wait for a task to finish; else the server had no more for now
                    wait = None if len(reply.tasks) >= free else self._poll_delay(reply.retry_after_s)
                else:
                    if reply.message:
                        log.info("no work: %s", reply.message)
                    now = time.monotonic()
                    idle_since = idle_since if idle_since is not None else now
                    if o.once and n_running == 0:
                        log.info("no more work: exiting (--once)")
                        nothing_left = True
                        continue
                    if o.idle_exit_s is not None and now - idle_since >= o.idle_exit_s and n_running == 0:
                        log.info("no work for %.0f s: exiting (--idle-exit)", now - idle_since)
                        nothing_left = True
                        continue
                    wait = self._poll_delay(reply.retry_after_s)
            self.wake.wait(wait)

    def _poll_delay(self, retry_after_s: float) -> float:
        base = max(1.0, min(float(retry_after_s), self.opts.poll_max_s))
        return base * random.uniform(0.8, 1.2)

    def _work_request(self, host_id: int, free: int) -> WorkRequest:
        with self.lock:
            busy_cores = sum(r.task.resources.cores for r, _ in self.running.values())
            busy_mem = sum(r.task.resources.memory_mb for r, _ in self.running.values())
            busy_disk = sum(r.task.resources.disk_mb for r, _ in self.running.values())
        return WorkRequest(
            host_id=host_id,
            slots=free,
            free_cores=max(0, hostinfo.cores() - busy_cores),
            free_memory_mb=max(0, hostinfo.memory_mb() - busy_mem),
            free_disk_mb=max(0, hostinfo.disk_free_mb(self.work_dir) - busy_disk),
        )

    def _start(self, ctx: TaskContext, task: TaskAssignment) -> None:
        runner = TaskRunner(ctx, task)
        thread = threading.Thread(
            target=self._run_task, args=(runner,), name=f"task-{task.task_id}", daemon=True
        )
        with self.lock:
            self.running[task.task_id] = (runner, thread)
            self.taken += 1
        thread.start()

    def _run_task(self, runner: TaskRunner) -> None:
        try:
            outcome = runner.run()
        except Exception:
            log.exception("task %d: unexpected error; dropping it", runner.tid)
            outcome = Outcome.LOST
        runner.outcome = outcome
        self.wake.set()

    def _reap(self) -> int | None:
        """Collect finished runners; returns an exit status if one of them means the agent must stop."""
        status = None
        with self.lock:
            # A runner's outcome is set before it wakes us, while its thread may still be alive:
            # waiting for the thread to end here could miss the wake-up and leave the agent idle.
            done = [
                (tid, r)
                for tid, (r, th) in self.running.items()
                if r.outcome is not None or not th.is_alive()
            ]
            for tid, _ in done:
                del self.running[tid]
        for _, runner in done:
            outcome = runner.outcome or Outcome.LOST
            self.outcomes[outcome] += 1
            if outcome is Outcome.BLOCKED:
                log.error("volunteer is BLOCKED by the server: stopping")
                status = EXIT_REFUSED
            elif outcome is Outcome.VANISHED:
                log.warning("misbehave=vanish: abandoning every task and exiting")
                status = EXIT_OK
        if status is not None:
            self.kill.set()
        return status

    def _shutdown(self) -> None:
        with self.lock:
            running = list(self.running.values())
        if not running:
            return
        if self.kill.is_set() or self.behaviour.vanish_after_s is not None:
            for runner, _ in running:
                runner.abort.set()
        for runner, thread in running:
            thread.join()
            if runner.outcome is not None:
                self.outcomes[runner.outcome] += 1
        with self.lock:
            self.running.clear()

    def _summary(self) -> None:
        parts = ", ".join(
            f"{n} {o.value}" for o, n in sorted(self.outcomes.items(), key=lambda x: x[0].value)
        )
        log.info(
            "agent done after %.0f s: %d task(s) taken%s", time.monotonic() - self.started, self.taken,
            f" ({parts})" if parts else "",
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the `airlock agent` subcommand wires the same functions)."""
    parser = argparse.ArgumentParser(
        prog="airlock agent", description=__doc__.split("\n")[0] if __doc__ else None
    )
    add_agent_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_agent(options_from_args(ns))


if __name__ == "__main__":
    sys.exit(main())
