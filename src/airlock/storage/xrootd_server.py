"""A private XRootD server for the tests and the demo: XrdHttp over TLS, the SciTokens plugin trusting our
token issuer, adler32 checksums, on a free loopback port, in a folder of its own.

The issuer's public keys are preloaded into the scitokens-cpp key cache, so the server never fetches them
over the network. XRootD refuses to run as root: started by root it drops to the `xrootd` user (`-R`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("airlock.storage")
SERVICE_USER = "xrootd"
STOP_GRACE_S = 2.0
STARTUP_ATTEMPTS = 3  # starts of a server that a signal killed while starting
KEYCACHE_YEARS = 10


class XRootDUnavailable(RuntimeError):
    """The xrootd binary or its plugins are missing, or the server did not come up."""


@dataclass(frozen=True)
class TestPKI:
    """A throw-away CA and a host certificate for 127.0.0.1/localhost, made with `cryptography`."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(folder: Path, host: str = "localhost") -> TestPKI:
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Airlock test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    host_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(host_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = TestPKI(folder / "ca.pem", folder / "hostcert.pem", folder / "hostkey.pem")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        host_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.key_file.chmod(0o600)
    return pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preload_keycache(cache_home: Path, issuer: str, jwks: dict[str, Any]) -> Path:
    """Write the issuer's keys where scitokens-cpp looks before fetching them (its sqlite key cache)."""
    folder = cache_home / "scitokens"
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "scitokens_cpp.sqllite"  # sic: the library's own spelling
    far = int(time.time()) + KEYCACHE_YEARS * 365 * 86400
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS keycache"
            " (issuer text UNIQUE PRIMARY KEY NOT NULL, keys text NOT NULL)"
        )
        conn.execute(
            "INSERT OR REPLACE INTO keycache (issuer, keys) VALUES (?, ?)",
            (issuer, json.dumps({"jwks": jwks, "next_update": far, "expires": far})),
        )
    conn.close()
    return db


def render_config(*, root: Path, port: int, pki: TestPKI, scitokens_cfg: Path, admin: Path) -> str:
    return "\n".join(
        [
            "all.export /",
            f"all.adminpath {admin}",
            f"all.pidpath {admin}",
            f"oss.localroot {root}",
            "xrd.port any",  # the root:// port: we only use HTTPS, so let the system pick one
            f"xrd.protocol XrdHttp:{port} libXrdHttp.so",
            f"xrd.tls {pki.cert_file} {pki.key_file}",
            f"xrd.tlsca certfile {pki.ca_file}",
            "http.header2cgi Authorization authz",
            "http.tlsreuse off",
            "xrootd.chksum adler32",
            "xrootd.seclib libXrdSec.so",
            "sec.protocol ztn",
            "ofs.authorize 1",
            f"ofs.authlib libXrdAccSciTokens.so config={scitokens_cfg}",
            "",
        ]
    )


def render_scitokens(issuer: str, audiences: list[str], base_path: str = "/") -> str:
    """Tokens' paths are relative to `base_path` (Airlock's namespace on a shared server)."""
    return "\n".join(
        [
            "[Global]",
            f"audience = {', '.join(audiences)}",
            "",
            "[Issuer airlock]",
            f"issuer = {issuer}",
            f"base_path = {base_path}",
            "",
        ]
    )


@dataclass
class XRootDServer:
    """`with XRootDServer(issuer, jwks, audiences) as srv:` serves https://localhost:<port>/ until exit."""

    issuer: str
    jwks: dict[str, Any]
    audiences: list[str]
    base_path: str = "/"  # the namespace token paths map to: Airlock's storage_url is url + base_path
    folder: Path | None = None
    port: int = 0
    startup_timeout_s: float = 20.0
    pki: TestPKI = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _owned_folder: bool = field(default=False, init=False)
    _cmd: list[str] = field(default_factory=list, init=False)
    _env: dict[str, str] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def data_root(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        assert self.folder is not None
        return self.folder / "xrootd.log"

    def start(self) -> Self:
        binary = shutil.which("xrootd")
        if binary is None:
            raise XRootDUnavailable(
                "xrootd is not installed (Debian: xrootd-server xrootd-scitokens-plugins)"
            )
        if self.folder is None:
            # not under pytest's tmp_path: its parents are 0700 root, which the xrootd user cannot cross
            self.folder = Path(tempfile.mkdtemp(prefix="airlock-xrootd-"))
            self._owned_folder = True
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        self.port = self.port or free_port()
        self.pki = make_pki(self.folder / "pki")
        self.data_root.mkdir(exist_ok=True)
        admin = self.folder / "admin"
        admin.mkdir(exist_ok=True)
        cache_home = self.folder / "cache"
        preload_keycache(cache_home, self.issuer, self.jwks)
        scitokens_cfg = self.folder / "scitokens.cfg"
        scitokens_cfg.write_text(render_scitokens(self.issuer, self.audiences, self.base_path))
        cfg = self.folder / "xrootd.cfg"
        cfg.write_text(
            render_config(
                root=self.data_root, port=self.port, pki=self.pki, scitokens_cfg=scitokens_cfg, admin=admin
            )
        )
        self._cmd = [binary, "-c", str(cfg), "-l", str(self.log_file), "-n", f"airlock{self.port}"]
        if os.geteuid() == 0:
            _give_to_service_user(self.folder)
            self._cmd[1:1] = ["-R", SERVICE_USER]
        self._env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "HOME": str(self.folder)}
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        """Start the server and wait until it answers. A server killed by a signal while it starts (XRootD
        5.5.3 has been seen to crash with SIGSEGV as the first TLS connections come in) is started again,
        up to STARTUP_ATTEMPTS times in all; any other failure is final at once."""
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            self._proc = subprocess.Popen(
                self._cmd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                self._wait_ready()
                return
            except XRootDUnavailable as exc:
                code = self._proc.poll()
                if code is None or code >= 0 or attempt == STARTUP_ATTEMPTS:
                    raise XRootDUnavailable(f"{exc} (start {attempt} of {STARTUP_ATTEMPTS})") from None
                log.warning("xrootd was killed by signal %d while starting; starting it again", -code)

    def answers(self, timeout_s: float = 5.0) -> bool:
        """Whether the server completes a TLS handshake and answers a request in time."""
        ctx = ssl.create_default_context(cafile=self.pki.ca_file)
        try:
            with httpx.Client(verify=ctx, timeout=timeout_s) as client:
                client.request("HEAD", f"{self.url}/")
        except httpx.TransportError:
            return False
        return True

    def revive(self) -> bool:
        """Restart the server (same port, files and certificate) if it died or stopped answering;
        True if it had to. XRootD 5.5.3's XrdHttp can hang or crash under concurrent TLS connections
        (upstream xrootd/xrootd#1940, #2226); a long-running demo must outlive that."""
        if self._proc is not None and self._proc.poll() is None and self.answers():
            return False
        self._kill()
        self._launch()
        return True

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(verify=ssl.create_default_context(cafile=self.pki.ca_file), timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise XRootDUnavailable(f"xrootd exited with {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    client.request("HEAD", f"{self.url}/")
                    return
                except httpx.TransportError:
                    time.sleep(0.1)
        raise XRootDUnavailable(f"xrootd did not answer on port {self.port}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log (with -n NAME, xrootd writes it under a folder named NAME)."""
        assert self.folder is not None
        for log in self.folder.rglob("xrootd.log"):
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _kill(self) -> None:
        """SIGTERM, then SIGKILL after a short grace: XRootD exits slowly."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self._kill()
        if self._owned_folder and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _give_to_service_user(folder: Path) -> None:
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError as exc:
        raise XRootDUnavailable(
            f"no {SERVICE_USER!r} user to run xrootd as (Debian's xrootd-server adds it)"
        ) from exc
    for dirpath, _dirs, names in os.walk(folder):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for n in names:
            os.chown(Path(dirpath, n), user.pw_uid, user.pw_gid)
