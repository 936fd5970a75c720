"""The background loops of a gateway process: lease expiry, validator, assimilator, janitor, and with
an upstream WMS (``upstream = "dirac"``) its job generator, status reporter and output hand-back.

Each loop runs in its own thread and claims its work through the database, so several gateway
processes may run them side by side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from airlock.assimilator.assimilate import assimilate_pending
from airlock.assimilator.janitor import PARTIAL_MAX_AGE_S, sweep_quarantine
from airlock.boinc.apps import boinc_dir
from airlock.boinc.upload import sweep_staging
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
