"""Signed app versions, as the gateway serves them to BOINC clients.

`sign_app` runs where the code-signing private key lives (offline, not on the serving host): it puts an
app version under `<data_dir>/boinc/apps/<app>/<version>/<platform>/` with each file, its `.sig`, and a
manifest, and the project's public key at `<data_dir>/boinc/code_sign_public`. That folder is all the
gateway needs; the private key never goes there. A released version is immutable (BOINC's practice):
signing the same app and version again is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from airlock.boinc.signing import (
    SignatureError,
    file_md5_hex,
    load_private,
    parse_public_key_text,
    public_key_text,
    sign_file,
    verify_file,
)
from airlock.core.schemas import FILE_NAME_RE

PUBLIC_KEY_FILE = "code_sign_public"
MANIFEST = "app_version.json"
STAMP = "apps.stamp"  # touched on every publication, so serving processes know to reload
ANY_PLATFORM = "any"


@dataclass(frozen=True)
class AppFile:
    name: str
    size: int
    md5: str
    signature: str
    main_program: bool


@dataclass(frozen=True)
class AppVersion:
    app: str
    version: int
    platform: str  # a BOINC platform name such as x86_64-pc-linux-gnu, or "any"
    folder: Path
    files: tuple[AppFile, ...]


def wrapper_path() -> Path:
    """The Airlock wrapper app shipped with the package (sign it with `airlock boinc sign-app --wrapper`)."""
    return Path(__file__).parent / "app" / "airlock_wrapper.py"


def boinc_dir(data_dir: Path) -> Path:
    return data_dir / "boinc"


def _name(value: str, what: str) -> str:
    if not FILE_NAME_RE.match(value) or value.endswith(".sig"):
        raise ValueError(f"{what} {value!r} is not a plain file name")
    return value


def sign_app(
    key_file: Path,
    data_dir: Path,
    app: str,
    version: int,
    files: list[Path],
    *,
    platform: str = ANY_PLATFORM,
    main: str | None = None,
) -> AppVersion:
    """Sign `files` and publish them as app version `version` of `app` (the first file, or `main`, is the
    main program the client runs)."""
    key_file, data_dir = key_file.resolve(), data_dir.resolve()
    if key_file.is_relative_to(data_dir):
        raise ValueError(
            f"the code-signing private key {key_file} is inside the gateway's data folder: keep it offline"
        )
    if version < 1:
        raise ValueError("an app version number is a positive integer (e.g. 100 for 1.00)")
    _name(app, "app name")
    _name(platform, "platform")
    if not files:
        raise ValueError("no files to sign")
    names = [_name(f.name, "file") for f in files]
    if len(set(names)) != len(names):
        raise ValueError("two files of an app version share a name")
    main_name = main or names[0]
    if main_name not in names:
        raise ValueError(f"the main program {main_name!r} is not among the files")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f} is not a file")
    key = load_private(key_file)
    public_text = public_key_text(key.public_key())
    base = boinc_dir(data_dir)
    base.mkdir(parents=True, exist_ok=True)
    public_file = base / PUBLIC_KEY_FILE
    if public_file.exists() and public_file.read_text() != public_text:
        raise SignatureError(
            f"{public_file} holds another key: clients trust the first key a project sent them, so "
            "sign with that key"
        )
    folder = base / "apps" / app / str(version) / platform
    if folder.exists():
        raise FileExistsError(
            f"{app} version {version} for {platform} exists; released versions never change"
        )
    staging = folder.with_name(f".{platform}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = []
    for f in files:
        target = staging / f.name
        shutil.copy2(f, target)
        signature = sign_file(key, target)
        (staging / f"{f.name}.sig").write_text(signature)
        manifest.append(
            {"name": f.name, "size": target.stat().st_size, "md5": file_md5_hex(target),
             "main_program": f.name == main_name}
        )  # fmt: skip
    (staging / MANIFEST).write_text(
        json.dumps({"app": app, "version": version, "platform": platform, "files": manifest}, indent=2)
    )
    if not public_file.exists():
        public_file.write_text(public_text)
    staging.rename(folder)  # the version appears whole or not at all
    (base / STAMP).write_text(f"{app} {version} {platform}\n")
    return load_app_version(data_dir, folder)


def load_app_version(data_dir: Path, folder: Path) -> AppVersion:
    """Read one published version, checking every file against its signature and the project key."""
    public = parse_public_key_text((boinc_dir(data_dir) / PUBLIC_KEY_FILE).read_text())
    meta = json.loads((folder / MANIFEST).read_text())
    files = []
    for entry in meta["files"]:
        path = folder / _name(entry["name"], "file")
        signature = (folder / f"{entry['name']}.sig").read_text()
        if not verify_file(public, path, signature):
            raise SignatureError(f"{path}: its signature does not verify with the project's key")
        files.append(AppFile(entry["name"], path.stat().st_size, file_md5_hex(path), signature,
                             bool(entry["main_program"])))  # fmt: skip
    return AppVersion(meta["app"], int(meta["version"]), meta["platform"], folder, tuple(files))


def app_versions(data_dir: Path) -> list[AppVersion]:
    """Every published app version, newest version first per app."""
    root = boinc_dir(data_dir) / "apps"
    found = (
        [load_app_version(data_dir, m.parent) for m in root.glob(f"*/*/*/{MANIFEST}")]
        if root.exists()
        else []
    )
    return sorted(found, key=lambda v: (v.app, -v.version, v.platform))
