"""Credential issuance benchmark: tokens/s and X.509 proxies/s through the HTTP API of a real
`airlock serve`, against a bare in-process signature of the same kind in the same run.

- tokens: POST /api/v1/auth/refresh (verify the caller's token, check it is active, sign an ES256 WLCG
  token, record it) vs. `jwt.encode(..., ES256)` alone;
- proxies: POST /api/v1/credentials/x509 with a CSR (check the CSR, sign an RFC 3820 proxy with the
  volunteer's cached RSA-2048 end-entity certificate, record it) vs. building and signing the same proxy
  certificate alone.

Targets: >= 1,000 tokens/s and >= 200 proxies/s. Run: `make bench` or `python bench/credentials.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from reexec import ensure_venv

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


ensure_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import jwt  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from airlock.agent.proxy import new_request  # noqa: E402
from airlock.credentials.vccs import PCI_INHERIT_ALL, PROXY_CERT_INFO  # noqa: E402
from harness import free_port, stop_process, wait_healthy  # noqa: E402
from loadgen import Connection, install_fast_loop  # noqa: E402

LOCAL = "127.0.0.1"
OPERATOR = "bench-operator-token"
PASSWORD = "bench-password-1"
TARGETS = {"tokens": 1000.0, "proxies": 200.0}
console = Console()


# ------------------------------------------------------------------------------------ in-process baselines


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn()
        n += 1
    return n / elapsed


def token_baseline(seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    claims = {"wlcg.ver": "1.0", "iss": "https://x", "sub": "1", "aud": "https://x", "scope": "compute.read",
              "iat": now, "nbf": now, "exp": now + 3600, "jti": "0" * 32}  # fmt: skip
    return rate(lambda: jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k"}), seconds)


def proxy_baseline(seconds: float) -> float:
    eec_key = rsa.generate_private_key(65537, 2048)
    proxy_key = rsa.generate_private_key(65537, 2048)
    eec_name = x509.Name.from_rfc4514_string("CN=1,OU=Volunteers,DC=example,DC=org")
    now = datetime.now(UTC)

    def sign() -> x509.Certificate:
        subject = x509.Name(
            [*eec_name.rdns, x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "7")])]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(eec_name)
            .public_key(proxy_key.public_key())
            .serial_number(7)
            .not_valid_before(now)
            .not_valid_after(now + timedelta(hours=12))
            .add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO, PCI_INHERIT_ALL), critical=True)
            .sign(eec_key, hashes.SHA256())
        )

    return rate(sign, seconds)


# ------------------------------------------------------------------------------------------ through HTTP


async def hammer(port: int, conns: int, seconds: float, raw: bytes) -> tuple[int, int, float]:
    """`conns` keep-alive connections sending `raw` back to back for `seconds`: (ok, failed, elapsed)."""
    ok = failed = 0
    deadline = time.monotonic() + seconds

    async def one() -> None:
        nonlocal ok, failed
        conn = Connection(LOCAL, port)
        try:
            while time.monotonic() < deadline:
                r = await conn.send(raw)
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1
                    if failed == 1:
                        console.print(f"[yellow]HTTP {r.status}: {r.text(300)}[/]")
        finally:
            conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(conns)))
    return ok, failed, time.monotonic() - t0


def request(method: str, path: str, port: int, token: str, document: Any) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode() if document is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {LOCAL}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    env.update(
        {
            "AIRLOCK_DATA_DIR": str(data),
            "AIRLOCK_OPERATOR_TOKEN": OPERATOR,
            "AIRLOCK_PUBLIC_URL": f"http://{LOCAL}:{port}",
            "AIRLOCK_WORKERS": str(args.workers),
            "AIRLOCK_BACKGROUND": "false",
        }
    )
    if args.database_url:
        env["AIRLOCK_DATABASE_URL"] = args.database_url
    airlock = str(Path(sys.executable).parent / "airlock")
    for cmd in (["init"], ["ca", "init"]):
        subprocess.run([airlock, *cmd], env=env, check=True, capture_output=True, timeout=120)
    log = data / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [airlock, "serve", "--port", str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        await wait_healthy(LOCAL, port, proc, log)
        conn = Connection(LOCAL, port, timeout=30)
        op = [("Authorization", f"Bearer {OPERATOR}"), ("Content-Type", "application/json")]
        r = await conn.request(
            "POST", "/api/v1/volunteers", json.dumps({"name": "bench", "password": PASSWORD}).encode(), op
        )
        assert r.status == 201, r.text()
        r = await conn.request_json("POST", "/api/v1/auth/token", {"username": "bench", "password": PASSWORD})
        assert r.status == 200, r.text()
        token = r.json()["access_token"]
        _, csr = new_request()
        proxy_req = request("POST", "/api/v1/credentials/x509", port, token, {"csr": csr})
        r = await conn.send(proxy_req)  # signs the EEC once: the cache's first fill is not measured
        assert r.status == 200, r.text()
        conn.close()
        results: dict[str, Any] = {}
        for what, raw in (
            ("tokens", request("POST", "/api/v1/auth/refresh", port, token, None)),
            ("proxies", proxy_req),
        ):
            await hammer(port, args.connections, args.warmup, raw)
            ok, failed, elapsed = await hammer(port, args.connections, args.seconds, raw)
            results[what] = {"per_s": ok / elapsed, "ok": ok, "failed": failed}
        return results
    finally:
        stop_process(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each measured phase")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="server processes")
    p.add_argument("--database-url", help="PostgreSQL URL (default: SQLite in the temporary data folder)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    install_fast_loop()
    baseline = {"tokens": token_baseline(args.seconds / 2), "proxies": proxy_baseline(args.seconds / 2)}
    with tempfile.TemporaryDirectory(prefix="airlock-bench-cred-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    table = Table(
        title=f"credential issuance ({args.workers} server processes, {args.connections} connections)"
    )
    for col in ("", "through HTTP /s", "bare signature /s", "share of baseline", "target /s", "failed"):
        table.add_column(col, justify="right")
    for what in ("tokens", "proxies"):
        got = results[what]
        results[what].update(baseline_per_s=baseline[what], target_per_s=TARGETS[what])
        table.add_row(
            what, f"{got['per_s']:.0f}", f"{baseline[what]:.0f}", f"{got['per_s'] / baseline[what]:.3f}",
            f"{TARGETS[what]:.0f}", str(got["failed"]),
        )  # fmt: skip
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    met = all(results[w]["per_s"] >= TARGETS[w] and results[w]["failed"] == 0 for w in TARGETS)
    tokens, proxies = results["tokens"]["per_s"], results["proxies"]["per_s"]
    verdict = "targets met" if met else "below target"
    print(f"credentials: {tokens:.0f} tokens/s, {proxies:.0f} proxies/s ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
