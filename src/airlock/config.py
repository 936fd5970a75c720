"""Gateway configuration: a TOML file (`--config` or AIRLOCK_CONFIG) overlaid by AIRLOCK_* variables."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "AIRLOCK_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default=Path("airlock-data"), description="keys, SQLite file and local storage")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in data_dir if unset")
    public_url: str = Field(
        default="http://127.0.0.1:8080", description="URL volunteers reach the gateway at"
    )
    bind_host: str = "127.0.0.1"
    bind_port: int = 8080
    workers: int = Field(default=1, ge=1, description="server processes")
    database_connections: int = Field(
        default=24,
        ge=4,
        description="PostgreSQL: connections one gateway process opens at most (its pool); `serve` refuses "
        "to start when all its processes could open more than the server admits",
    )
    operator_token: str | None = Field(default=None, description="bearer token of the operator API")
    open_registration: bool = False
    issuer: str | None = Field(default=None, description="token issuer; public_url if unset")
    access_token_ttl_s: int = Field(default=3600, ge=60)
    ca_dn_base: str = Field(default="/DC=org/DC=airlock", description="DN base of the gateway's CA")
    eec_lifetime_s: int = Field(default=7 * 86400, ge=3600, description="volunteer end-entity certificates")
    proxy_lifetime_s: int = Field(default=12 * 3600, ge=300, description="volunteer X.509 proxies (at most)")
    tls_cert_file: Path | None = Field(default=None, description="serve HTTPS with this certificate (PEM)")
    tls_key_file: Path | None = Field(default=None, description="the key of tls_cert_file")
    lease_s: int = Field(
        default=600, ge=5, description="a lease not renewed by a heartbeat this long is lost"
    )
    heartbeat_interval_s: int = Field(default=60, ge=1)
    upload_token_ttl_s: int = Field(
        default=1800,
        ge=60,
        description="upload token lifetime; each heartbeat hands out a new one, never past the deadline",
    )
    daily_quota_per_core: int = Field(default=100, ge=1, description="BOINC's max jobs per day per core")
    retry_after_s: int = Field(default=30, ge=1, description="what a host with no work is told to wait")
    quarantine_retention_s: int = Field(default=3 * 86400, ge=0)
    loop_interval_s: float = Field(default=1.0, gt=0, description="period of validator/assimilator loops")
    background: bool = Field(default=True, description="run validator, assimilator and expiry in `serve`")
    max_archive_unpacked: int = Field(default=4 * 2**30, description="cap on an output archive's contents")
    bridge: Literal["local", "xrootd"] = Field(
        default="local",
        description="quarantine and trusted storage: local folders, or a WLCG-token HTTPS endpoint (XRootD, "
        "dCache, EOS) that volunteers upload to directly (docs/storage.md)",
    )
    storage_url: str | None = Field(default=None, description="bridge=xrootd: the namespace's HTTPS URL")
    storage_ca_file: Path | None = Field(default=None, description="CA that signed the storage's certificate")
    storage_audience: str | None = Field(
        default=None, description="audience of the gateway's own storage token; storage_url if unset"
    )

    boinc_project_name: str = Field(default="Airlock", description="BOINC: the name clients show")
    boinc_app: str = Field(
        default="airlock_wrapper", description="BOINC: the signed app that runs every Airlock job"
    )
    boinc_vacuum: bool = Field(
        default=False,
        description="BOINC: send pilots that run the Airlock agent with a per-volunteer token (the CMS@home "
        "vacuum model) instead of one Airlock task per workunit",
    )
    boinc_vacuum_app: str = Field(default="airlock_vacuum", description="BOINC: the signed app of the pilots")
    boinc_pilot_hours: float = Field(default=12, gt=0, description="BOINC: a pilot's report deadline")
    boinc_next_rpc_delay_s: float = Field(
        default=3600, gt=0, description="BOINC: a client asks again after this long even with nothing to do"
    )
    boinc_abort_ack_delay_s: float = Field(
        default=60,
        ge=0,
        description="BOINC: an aborted result is acknowledged only this long after the abort was sent, so "
        "the client has killed the app first (it kills a non-API app after 60 s)",
    )
    boinc_max_upload_bytes: int = Field(
        default=2**30, ge=1, description="BOINC: cap on one upload request (each output has its own cap)"
    )

    # ------------------------------------------------------------------ upstream (docs/upstream.md)
    upstream: Literal["airlock", "dirac"] = Field(
        default="airlock",
        description="where jobs come from: Airlock's own submission API only, or also pulled from DIRAC",
    )
    dirac_dir: Path | None = Field(
        default=None,
        description="DIRAC: a folder with dirac.json (python + env), as scripts/dirac/up.sh makes",
    )
    dirac_python: Path | None = Field(default=None, description="DIRAC: python of DIRAC's own venv")
    dirac_env_file: Path | None = Field(
        default=None,
        description="DIRAC: KEY=VALUE lines (DIRACSYSCONFIG, X509_CERT_DIR, ...) for that python",
    )
    dirac_timeout_s: float = Field(default=120, gt=0, description="DIRAC: one call's time limit")
    dirac_site: str = Field(default="BOINC.Airlock.org", description="DIRAC: the site the gateway is")
    dirac_ce: str = Field(default="boinc.airlock.org", description="DIRAC: its computing element (GridCE)")
    dirac_queue: str = Field(default="boinc", description="DIRAC: its queue")
    dirac_resource: dict[str, str | int | float | list[str]] = Field(
        default_factory=dict,
        description="DIRAC: more of the resource description given to the Matcher (CPUTime, Tag, ...)",
    )
    dirac_owner_proxy_dir: Path | None = Field(
        default=None, description="DIRAC: a folder of <owner>.proxy files (the owners' proxies)"
    )
    dirac_owner_proxy_command: str | None = Field(
        default=None,
        description="DIRAC: a command that prints the owner's proxy (PEM) on stdout; {owner}, {group} and "
        "{dn} are replaced (shell-quoted)",
    )
    dirac_output_se: str | None = Field(
        default=None, description="DIRAC: the SE for OutputData when the JDL names no OutputSE"
    )
    dirac_failure_policy: Literal["fail", "reschedule"] = Field(
        default="fail",
        description="DIRAC: a job whose attempts run out is reported Failed, or handed back to DIRAC",
    )
    dirac_max_input_bytes: int = Field(
        default=100 * 10**6, ge=0, description="DIRAC: cap on a job's sandbox plus input data"
    )
    dirac_max_output_bytes: int = Field(default=10**9, ge=1, description="DIRAC: cap on each output file")
    dirac_poll_interval_s: float = Field(
        default=30, gt=0, description="DIRAC: period of the match, status and output loops when idle"
    )
    dirac_heartbeat_interval_s: float = Field(
        default=300, ge=0, description="DIRAC: least time between two heartbeats of one job"
    )
    dirac_max_queued: int = Field(
        default=50, ge=0, description="DIRAC: stop matching while this many DIRAC jobs wait for a volunteer"
    )
    dirac_match_per_pass: int = Field(default=10, ge=1, description="DIRAC: jobs matched per loop pass")
    dirac_executables: list[str] = Field(
        default_factory=lambda: ["/bin/sh", "/bin/bash", "sh", "bash", "python3", "/usr/bin/python3"],
        description="DIRAC: Executables run as given (a .sh or .py from the input sandbox is also accepted)",
    )
    dirac_max_cores: int = Field(default=1, ge=1, description="DIRAC: most NumberOfProcessors accepted")
    dirac_max_cpu_time: int = Field(default=7 * 86400, ge=1, description="DIRAC: most CPUTime accepted")
    dirac_tags: list[str] = Field(default_factory=list, description="DIRAC: Tags the volunteers provide")
    dirac_memory_mb: int = Field(default=2048, ge=16, description="DIRAC: memory asked of a volunteer")
    dirac_disk_mb: int = Field(default=4096, ge=1, description="DIRAC: disk asked of a volunteer")
    dirac_copies: int = Field(default=1, ge=1, le=16, description="DIRAC: tasks per job at once")
    dirac_quorum: int = Field(default=1, ge=1, le=16, description="DIRAC: agreeing results needed")
    dirac_max_attempts: int = Field(default=3, ge=1, le=100, description="DIRAC: tasks a job may use")
    dirac_deadline_s: int = Field(default=86400, ge=10, description="DIRAC: report deadline of each task")
    dirac_app: str | None = Field(
        default=None, description="DIRAC: validator app of the jobs (None: default)"
    )

    @field_validator("public_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _storage_endpoint(self) -> Settings:
        if self.bridge == "xrootd" and not (self.storage_url or "").startswith("https://"):
            raise ValueError("bridge = 'xrootd' needs storage_url, the endpoint's https:// URL")
        if self.upstream == "dirac" and self.dirac_dir is None and self.dirac_python is None:
            raise ValueError("upstream = 'dirac' needs dirac_dir, or dirac_python (and dirac_env_file)")
        if self.dirac_quorum > self.dirac_copies:
            raise ValueError("dirac_quorum cannot exceed dirac_copies")
        return self

    # ---------------------------------------------------------------------------------------- derived
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'airlock.db').resolve()}"

    @property
    def token_issuer(self) -> str:
        return self.issuer or self.public_url

    @property
    def upload_base_url(self) -> str:
        """Where volunteers upload outputs: the gateway's own bridge, or the storage endpoint directly."""
        return (self.storage_url or "").rstrip("/") if self.bridge == "xrootd" else self.public_url

    @property
    def boinc_master_url(self) -> str:
        """The BOINC project URL volunteers attach to (BOINC wants the trailing slash)."""
        return f"{self.public_url}/boinc/"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


def _coerce_env(name: str, raw: str) -> Any:
    field = Settings.model_fields[name]
    if field.annotation is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if name in _JSON_ENV:  # lists and tables: JSON in the variable
        return json.loads(raw)
    return raw


_JSON_ENV = frozenset({"dirac_resource", "dirac_executables", "dirac_tags"})


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < TOML file < AIRLOCK_* environment < explicit overrides (CLI flags)."""
    values: dict[str, Any] = {}
    path = config_file or (Path(os.environ["AIRLOCK_CONFIG"]) if os.environ.get("AIRLOCK_CONFIG") else None)
    if path is not None:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        values.update(doc.get("airlock", doc))
    for name in Settings.model_fields:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = _coerce_env(name, env)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(values)
