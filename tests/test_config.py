"""Settings: defaults < TOML file < AIRLOCK_* environment < explicit overrides; unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from airlock.config import load_settings


def test_toml_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AIRLOCK_CONFIG", "AIRLOCK_LEASE_S", "AIRLOCK_OPEN_REGISTRATION", "AIRLOCK_BIND_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = tmp_path / "airlock.toml"
    cfg.write_text('[airlock]\nlease_s = 120\nbind_port = 9000\npublic_url = "https://gw.example.org/"\n')
    s = load_settings(cfg)
    assert (s.lease_s, s.bind_port, s.public_url) == (120, 9000, "https://gw.example.org")
    assert s.open_registration is False and s.heartbeat_interval_s == 60  # defaults
    monkeypatch.setenv("AIRLOCK_LEASE_S", "300")
    monkeypatch.setenv("AIRLOCK_OPEN_REGISTRATION", "true")
    s = load_settings(cfg)
    assert (s.lease_s, s.open_registration) == (300, True)
    s = load_settings(cfg, lease_s=30, bind_port=None)  # None means "flag not given"
    assert (s.lease_s, s.bind_port) == (30, 9000)
    monkeypatch.setenv("AIRLOCK_CONFIG", str(cfg))
    assert load_settings().bind_port == 9000


def test_unknown_or_malformed_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_LEASE_S", raising=False)
    cfg = tmp_path / "airlock.toml"
    cfg.write_text("lease_seconds = 5\n")
    with pytest.raises(ValidationError, match="lease_seconds"):
        load_settings(cfg)
    monkeypatch.setenv("AIRLOCK_LEASE_S", "soon")
    with pytest.raises(ValidationError, match="lease_s"):
        load_settings()


def test_sqlite_database_lives_in_the_data_dir_unless_a_url_is_given(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path / "d")
    assert s.db_url == f"sqlite:///{(tmp_path / 'd' / 'airlock.db').resolve()}"
    assert load_settings(database_url="postgresql://u@h/db").db_url == "postgresql://u@h/db"
