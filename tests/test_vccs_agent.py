"""The agent side of VCCS: fetch a proxy (key made locally), write the grid proxy file, renew it; and
`airlock agent --proxy-file` against a real gateway process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from airlock.agent.client import Blocked
from airlock.agent.proxy import ProxyKeeper, basic_auth, needs_renewal
from airlock.credentials.ca import init_ca

from .helpers import PASSWORD, Api
from .live import LiveGateway
from .test_vccs import DN, need


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"ca_dn_base": DN}


def check_proxy_file(path: Path, ca_chain: bytes, tmp: Path) -> x509.Certificate:
    """proxy cert, its key (matching), EEC: and OpenSSL verifies the chain."""
    data = path.read_bytes()
    proxy, eec = x509.load_pem_x509_certificates(data)
    key = serialization.load_pem_private_key(data, password=None)
    assert key.public_key() == proxy.public_key()
    assert path.stat().st_mode & 0o777 == 0o600
    (tmp / "ca.pem").write_bytes(ca_chain)
    (tmp / "eec.pem").write_bytes(eec.public_bytes(serialization.Encoding.PEM))
    r = subprocess.run(
        [need("openssl"), "verify", "-allow_proxy_certs", "-CAfile", str(tmp / "ca.pem"), "-untrusted",
         str(tmp / "eec.pem"), str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    return proxy


def test_keeper_fetches_keeps_and_renews(api: Api, tmp_path: Path) -> None:
    init_ca(api.gw.settings.keys_dir, DN, datetime.now(UTC))
    v = api.volunteer()
    path = tmp_path / "x509up"
    stop = threading.Event()
    keeper = ProxyKeeper(api.client, basic_auth(v.name, PASSWORD), path, 3600, stop)
    keeper.ensure()
    chain = api.client.get("/api/v1/ca/certificate").content
    first = check_proxy_file(path, chain, tmp_path)
    assert first.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=1)
    keeper.ensure()  # still fresh: kept
    assert x509.load_pem_x509_certificates(path.read_bytes())[0] == first
    later = datetime.now(UTC) + timedelta(minutes=50)
    assert needs_renewal(path, later)
    keeper.ensure(later)
    second = check_proxy_file(path, chain, tmp_path)
    assert second.serial_number != first.serial_number
    # Blocked: the renewal is refused as such, and the file is left as it was.
    api.op("POST", f"/api/v1/volunteers/{v.id}/block")
    with pytest.raises(Blocked, match="blocked"):
        keeper.ensure(later + timedelta(hours=1))
    assert x509.load_pem_x509_certificates(path.read_bytes())[0] == second


def test_agent_writes_a_proxy_file(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    init_ca(data / "keys", DN, datetime.now(UTC))
    gw = LiveGateway(data, ca_dn_base=DN).start()
    try:
        with gw.op() as op:
            r = op.post("/api/v1/volunteers", json={"name": "alice", "password": PASSWORD})
            assert r.status_code == 201, r.text
            vid = r.json()["id"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        (tmp_path / "pw").write_text(PASSWORD)
        proxy = tmp_path / "agent" / "x509up"
        run = subprocess.run(
            [sys.executable, "-m", "airlock", "agent", "--server", gw.url, "--user", "alice",
             "--password-file", str(tmp_path / "pw"), "--work-dir", str(tmp_path / "agent"), "--once",
             "--no-sandbox", "--proxy-file", str(proxy), "--proxy-lifetime", "7200"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        chain = httpx.get(f"{gw.url}/api/v1/ca/certificate").content
        cert = check_proxy_file(proxy, chain, tmp_path)
        assert f"CN={vid}" in cert.issuer.rfc4514_string()
        assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=2)
    finally:
        gw.stop()
