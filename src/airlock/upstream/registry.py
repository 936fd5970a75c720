"""One upstream connection per gateway (its engine), made on first use and closed at exit."""

from __future__ import annotations

import atexit
import threading
import weakref

from sqlalchemy import Engine

from airlock.context import Gateway
from airlock.upstream.sync import UpstreamSync

_lock = threading.Lock()
_syncs: weakref.WeakKeyDictionary[Engine, UpstreamSync] = weakref.WeakKeyDictionary()


def upstream_sync(gw: Gateway) -> UpstreamSync | None:
    """The gateway's upstream driver when it pulls jobs from an upstream (``upstream = "dirac"``)."""
    if gw.settings.upstream == "airlock":
        return None
    with _lock:
        sync = _syncs.get(gw.engine)
        if sync is None:
            from airlock.upstream.dirac import DiracUpstream

            sync = UpstreamSync(gw, DiracUpstream(gw.settings))
            _syncs[gw.engine] = sync
        return sync


def set_upstream_sync(gw: Gateway, sync: UpstreamSync) -> None:
    """Use this driver for the gateway (tests give theirs, with a client of their own DIRAC)."""
    with _lock:
        _syncs[gw.engine] = sync


def close_all() -> None:
    with _lock:
        syncs = list(_syncs.values())
        _syncs.clear()
    for sync in syncs:
        sync.upstream.close()


atexit.register(close_all)
