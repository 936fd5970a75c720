"""The gateway as a BOINC project: its URLs, its public code-signing key, its signed app versions and
the upload key its names are signed with. One per server process, reloaded when `sign-app` publishes."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from airlock.boinc.apps import ANY_PLATFORM, PUBLIC_KEY_FILE, STAMP, AppVersion, app_versions, boinc_dir
from airlock.boinc.names import NameSigner, load_upload_key
from airlock.config import Settings


@dataclass
class BoincProject:
    settings: Settings
    signer: NameSigner
    _versions: list[AppVersion] = field(default_factory=list)
    _code_sign_key: str | None = None
    _stamp: int | None = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)
    inputs: dict[str, tuple[int, str]] = field(default_factory=dict)  # sha256 -> (size, MD5) served

    @classmethod
    def open(cls, settings: Settings) -> BoincProject:
        project = cls(settings, NameSigner(load_upload_key(settings.keys_dir)))
        project.refresh()
        return project

    # ------------------------------------------------------------------------------------------ URLs
    @property
    def master_url(self) -> str:
        return self.settings.boinc_master_url

    @property
    def scheduler_url(self) -> str:
        return self.master_url + "cgi"

    @property
    def upload_url(self) -> str:
        return self.master_url + "file_upload_handler"

    def input_url(self, sha256: str) -> str:
        return f"{self.master_url}download/{self.signer.input_path(sha256)}"

    def app_base_url(self, version: AppVersion) -> str:
        return f"{self.master_url}apps/{version.app}/{version.version}/{version.platform}"

    @property
    def upload_staging(self) -> Path:
        return boinc_dir(self.settings.data_dir) / "uploads"

    # ---------------------------------------------------------------------------------- app versions
    def _current_stamp(self) -> int | None:
        try:
            return (boinc_dir(self.settings.data_dir) / STAMP).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def refresh(self) -> None:
        """Reload the app versions if `sign-app` published one since (one stat per call)."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            data_dir = self.settings.data_dir
            key_file = boinc_dir(data_dir) / PUBLIC_KEY_FILE
            self._code_sign_key = key_file.read_text() if key_file.exists() else None
            self._versions = app_versions(data_dir) if self._code_sign_key else []
            self._stamp = stamp

    @property
    def code_sign_key(self) -> str | None:
        return self._code_sign_key

    def version_for(self, app: str, platforms: list[str]) -> AppVersion | None:
        """The newest version of `app` the client can run: for one of its platforms, else for any."""
        self.refresh()
        usable = [v for v in self._versions if v.app == app and v.platform in {*platforms, ANY_PLATFORM}]
        return max(usable, key=lambda v: (v.version, v.platform != ANY_PLATFORM), default=None)

    def all_versions(self) -> list[AppVersion]:
        self.refresh()
        return list(self._versions)

    def app_file(self, app: str, version: int, platform: str, name: str) -> Path | None:
        """A published app file (only names in a version's manifest), for the download server."""
        self.refresh()
        for v in self._versions:
            same = (v.app, v.version, v.platform) == (app, version, platform)
            if same and any(f.name == name for f in v.files):
                return v.folder / name
        return None
