"""The background loops of a gateway process: lease expiry, validator, assimilator, janitor, and with
an upstream WMS (``upstream = "dirac"``) its job generator, status reporter and output hand-back.

Each loop runs in its own thread and claims its work through the database, so several gateway
processes may run them side by side.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from airlock.assimilator.assimilate import assimilate_pending
from airlock.assimilator.janitor import PARTIAL_MAX_AGE_S, sweep_quarantine
from airlock.boinc.apps import boinc_dir
from airlock.boinc.upload import sweep_staging
from airlock.config import Settings
from airlock.context import Gateway
from airlock.scheduler.leases import expire_leases
from airlock.upstream.registry import upstream_sync
from airlock.validator.validate import validate_pending

log = logging.getLogger("airlock.service")


@dataclass
class Loop:
    name: str
    step: Callable[[], int]
    interval: float
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                did = self.step()
            except Exception:
                log.exception("%s loop failed; retrying", self.name)
                did = 0
            if not did:  # busy loops go straight on; idle ones wait
                self.stop.wait(self.interval)


class BackgroundLoops:
    def __init__(self, gw: Gateway) -> None:
        s = gw.settings
        self.loops = [
            Loop("expiry", lambda: expire_leases(gw.engine, s), s.loop_interval_s),
            Loop("validator", lambda: validate_pending(gw.engine, gw.quarantine, s), s.loop_interval_s),
            Loop(
                "assimilator",
                lambda: assimilate_pending(gw.engine, gw.quarantine, gw.trusted),
                s.loop_interval_s,
            ),
            Loop(
                "janitor",
                lambda: sweep_quarantine(gw.engine, gw.quarantine, s, trusted=gw.trusted),
                max(60.0, s.loop_interval_s),
            ),
            Loop(
                "boinc-staging",
                lambda: sweep_staging(gw.engine, boinc_dir(s.data_dir) / "uploads", PARTIAL_MAX_AGE_S),
                max(60.0, s.loop_interval_s),
            ),
        ]
        sync = upstream_sync(gw)  # None for Airlock's own API: nothing to pull
        if sync is not None:
            # One loop, the three steps in turn: run side by side, a status report computed before the
            # hand-back reported Done could reach DIRAC after it, and the job would stay Running there.
            self.loops.append(
                Loop(
                    "upstream",
                    lambda: sync.generate() + sync.monitor() + sync.finish(),
                    s.dirac_poll_interval_s,
                )
            )

    def start(self) -> None:
        for loop in self.loops:
            loop.thread = threading.Thread(target=loop.run, name=f"airlock-{loop.name}", daemon=True)
            loop.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        for loop in self.loops:
            loop.stop.set()
        for loop in self.loops:
            if loop.thread is not None:
                loop.thread.join(timeout)

    def run_once(self) -> int:
        """One pass of every loop, in order (tests and `airlock worker --once`)."""
        return sum(loop.step() for loop in self.loops)


# ------------------------------------------------------------------------- the loops in a process
PARENT_POLL_S = 0.5


def _run_loops_until_told(settings: Settings, parent_pid: int, log_level: int) -> None:
    """A loops process: its own gateway connection, the loops in threads, until SIGTERM or its parent
    (the serving process) is gone."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gw = Gateway.open(settings, serving=False)
    loops = BackgroundLoops(gw)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    loops.start()
    try:
        while not done.wait(PARENT_POLL_S):
            if os.getppid() != parent_pid:
                log.warning("the serving process is gone; stopping the background loops")
                break
    finally:
        loops.stop()
        gw.close()


class LoopsProcess:
    """The background loops of a one-process `airlock serve`, run in a child process: on the GIL of
    the serving process they took about as much CPU as the requests (validating and assimilating a
    job costs about what dispatching it does), and the requests waited for it. Apart, each has a core.
    Their work is claimed through the database, as with several gateway processes. A child that dies
    is started again (after RESTART_DELAY_S), so a crash there never leaves a gateway without loops."""

    RESTART_DELAY_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.level = logging.getLogger("airlock").getEffectiveLevel()
        self.stopping = threading.Event()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.watcher: threading.Thread | None = None
        # held while a process is made and started: stop() then sees either none or a started one,
        # and no process is started once stop() has set `stopping` and taken it
        self._spawning = threading.Lock()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no engine or threads inherited
        process = ctx.Process(
            target=_run_loops_until_told,
            args=(self.settings, os.getpid(), self.level),
            name="airlock-loops",
        )
        process.start()
        self.process = process

    def _watch(self) -> None:
        # Waits on the process's sentinel, not with join(): two threads in waitpid() on one child race,
        # and the loser takes the reaped child for a live one. Only stop() reaps once stopping is set.
        while not self.stopping.is_set():
            assert self.process is not None
            multiprocessing.connection.wait([self.process.sentinel])
            if self.stopping.wait(self.RESTART_DELAY_S):
                return
            with self._spawning:
                if self.stopping.is_set():
                    return
                self.process.join()
                log.error(
                    "the background loops process exited (%s); starting it again", self.process.exitcode
                )
                self._spawn()

    def start(self) -> None:
        with self._spawning:
            self._spawn()
        self.watcher = threading.Thread(target=self._watch, name="airlock-loops-watch", daemon=True)
        self.watcher.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loops process (SIGTERM, SIGKILL after `timeout`) and the watcher; when it returns
        no loops process of this object is alive."""
        self.stopping.set()
        with self._spawning:
            process = self.process
        if process is not None:
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
        if self.watcher is not None:
            self.watcher.join(timeout)
