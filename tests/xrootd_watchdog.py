"""A watchdog for the tests' private XRootD servers."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from airlock.storage.xrootd_server import XRootDServer


@contextlib.contextmanager
def watched(server: XRootDServer, every_s: float = 5.0) -> Iterator[None]:
    """Restart the server, as `airlock demo --bridge xrootd` does, when it misses two checks in a row:
    Debian's XRootD 5.5.3 XrdHttp now and then stops answering under concurrent TLS connections
    (upstream xrootd/xrootd#1940, #2226; seen in CI: every request of a kill-point test timing out for
    minutes). The gateway's client then retries on a new connection, which the restarted server answers."""
    stop = threading.Event()

    def watch() -> None:
        misses = 0
        while not stop.wait(every_s):
            misses = 0 if server.answers() else misses + 1
            if misses >= 2:
                misses = 0
                if server.revive():
                    logging.getLogger(__name__).warning("XRootD stopped answering and was restarted")

    watcher = threading.Thread(target=watch, name="xrootd-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
