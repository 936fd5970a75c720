"""Gateway configuration: a TOML file (`--config` or AIRLOCK_CONFIG) overlaid by AIRLOCK_* variables."""

from __future__ import annotations

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

    @field_validator("public_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _storage_endpoint(self) -> Settings:
        if self.bridge == "xrootd" and not (self.storage_url or "").startswith("https://"):
            raise ValueError("bridge = 'xrootd' needs storage_url, the endpoint's https:// URL")
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
    return raw


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
