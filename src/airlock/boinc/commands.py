"""`airlock boinc keygen` (where the private key will live: offline) and `airlock boinc sign-app` (there
too; it writes only public material into the gateway's data folder)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
PRIVATE_FILE = "code_sign_private.pem"


def add_commands(sub: Any, gateway_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("boinc", help="BOINC project: code-signing key pair, signed app versions")
    actions = p.add_subparsers(dest="boinc_action", required=True, metavar="ACTION")
    k = actions.add_parser("keygen", help="make the code-signing key pair (keep the private key offline)")
    k.add_argument("--out", type=Path, required=True, help="folder for the key pair (created, mode 0700)")
    k.set_defaults(func=cmd_keygen)
    s = actions.add_parser("sign-app", help="sign app files and publish them as an app version")
    gateway_args(s)
    s.add_argument(
        "--key", type=Path, required=True, help="the private key from `keygen` (not in --data-dir)"
    )
    s.add_argument("--app", default=None, help="app name (default: the boinc_app setting, airlock_wrapper)")
    s.add_argument("--version", type=int, required=True, help="version number, e.g. 100 for 1.00")
    s.add_argument("--platform", default="any", help="BOINC platform, e.g. x86_64-pc-linux-gnu (default any)")
    s.add_argument("--main", help="the main program's file name (default: the first file)")
    s.add_argument(
        "--wrapper", action="store_true", help="sign the Airlock wrapper shipped with this package"
    )
    s.add_argument("files", nargs="*", type=Path, help="the app version's files")
    s.set_defaults(func=cmd_sign_app)


def cmd_keygen(ns: argparse.Namespace) -> int:
    from airlock.boinc.signing import generate_key, private_pem, public_key_text
    from airlock.credentials.keys import write_private

    out: Path = ns.out
    private = out / PRIVATE_FILE
    if private.exists():
        console.print(f"[red]{private} exists; not overwriting a code-signing key[/]")
        return 1
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_key()
    write_private(private, private_pem(key))
    (out / "code_sign_public").write_text(public_key_text(key.public_key()))
    console.print(f"private key: {private} (mode 0600; keep it offline, never on the gateway)")
    console.print(f"public key:  {out / 'code_sign_public'}")
    return 0


def cmd_sign_app(ns: argparse.Namespace) -> int:
    from airlock.boinc.apps import sign_app, wrapper_path
    from airlock.boinc.signing import SignatureError
    from airlock.cli import _settings

    settings = _settings(ns)
    files: list[Path] = ns.files + ([wrapper_path()] if ns.wrapper else [])
    if not files:
        console.print("[red]name the app's files, or give --wrapper[/]")
        return 1
    try:
        version = sign_app(
            ns.key,
            settings.data_dir,
            ns.app or settings.boinc_app,
            ns.version,
            files,
            platform=ns.platform,
            main=ns.main,
        )
    except (ValueError, FileExistsError, SignatureError, OSError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    console.print(f"{version.app} {version.version} ({version.platform}) published in {version.folder}:")
    for f in version.files:
        console.print(
            f"  {f.name}  {f.size} bytes  md5 {f.md5}{'  (main program)' if f.main_program else ''}"
        )
    return 0
