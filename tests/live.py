"""A real gateway process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from airlock.api.process import GatewayProcess

from .helpers import OPERATOR_TOKEN


class LiveGateway(GatewayProcess):
    """The test suite's gateway: the operator token of `helpers`, fast background loops, any other
    setting as keyword arguments (`lease_s="600"` becomes AIRLOCK_LEASE_S=600)."""

    def __init__(self, data_dir: Path, database_url: str | None = None, **settings: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        env.update({"AIRLOCK_OPERATOR_TOKEN": OPERATOR_TOKEN, "AIRLOCK_LOOP_INTERVAL_S": "0.2"})
        env.update({f"AIRLOCK_{k.upper()}": v for k, v in settings.items()})
        if database_url:
            env["AIRLOCK_DATABASE_URL"] = database_url
        super().__init__(data_dir, env, data_dir / "gateway.log")

    def op(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=30
        )
