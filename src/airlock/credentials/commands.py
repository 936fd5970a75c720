"""`airlock ca init|list|show|revoke|crl` and `airlock keys list|rotate`: run on the gateway host (they read
the data folder's keys and the database directly)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from rich.console import Console

console = Console()


def add_commands(sub: Any, gateway_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("ca", help="the gateway's online CA: create it, list, show and revoke what it issued")
    gateway_args(p)
    p.add_argument("action", choices=["init", "list", "show", "revoke", "crl", "export"])
    p.add_argument("serial", nargs="?", help="certificate serial in hex (show, revoke); export: a folder")
    p.add_argument("--dn-base", help="init: DN base such as /DC=org/DC=example (else setting ca_dn_base)")
    p.add_argument("--volunteer", type=int, help="list: only this volunteer's certificates")
    p.set_defaults(func=cmd_ca)

    p = sub.add_parser(
        "keys", help="token-signing keys: list, or rotate (new key signs; old ones still verify)"
    )
    gateway_args(p)
    p.add_argument("action", choices=["list", "rotate", "retire"])
    p.add_argument(
        "kid",
        nargs="?",
        help="retire: the key id (once its tokens have expired); an id made by an older Airlock that begins "
        "with '-' goes last, after `--`, with every option before the action: "
        "`airlock keys --data-dir D retire -- -pfC...`",
    )
    p.set_defaults(func=cmd_keys)


def cmd_ca(ns: argparse.Namespace) -> int:
    from airlock.cli import _settings
    from airlock.core.errors import BadInput
    from airlock.credentials import crl
    from airlock.credentials.ca import init_ca, load_ca, slash_dn
    from airlock.db.engine import make_engine, read

    settings = _settings(ns)
    if ns.action == "init":
        dn_base = ns.dn_base or settings.ca_dn_base
        created = init_ca(settings.keys_dir, dn_base, datetime.now(UTC))
        for path in created:
            console.print(f"created {path}")
        ca = load_ca(settings.keys_dir, dn_base)
        console.print(f"issuing CA: {slash_dn(ca.cert.subject)}" + ("" if created else " (already there)"))
        if ns.dn_base and ns.dn_base != settings.ca_dn_base:
            console.print(f"set ca_dn_base = {ns.dn_base!r} in the gateway's settings")
        return 0
    if ns.action in ("show", "revoke", "export") and not ns.serial:
        raise BadInput(f"`airlock ca {ns.action}` needs a {'folder' if ns.action == 'export' else 'serial'}")
    engine = make_engine(settings.db_url)
    try:
        if ns.action == "export":
            from airlock.credentials.certdir import export_cert_dir

            ca = load_ca(settings.keys_dir, settings.ca_dn_base)
            with read(engine) as conn:
                revocations = crl.build_crl(conn, ca, datetime.now(UTC))
            for path in export_cert_dir(ca, revocations, Path(ns.serial)):
                console.print(f"wrote {path}")
        elif ns.action == "crl":
            with read(engine) as conn:
                revocations = crl.build_crl(
                    conn, load_ca(settings.keys_dir, settings.ca_dn_base), datetime.now(UTC)
                )
            print(revocations.public_bytes(serialization.Encoding.PEM).decode(), end="")
        elif ns.action == "list":
            with read(engine) as conn:
                for item in crl.list_x509(conn, ns.volunteer):
                    flag = " REVOKED" if item["revoked"] else ""
                    console.print(
                        f"{item['serial']} {item['type']:5} vol {item['volunteer_id']} "
                        f"until {item['not_after']}{flag} {item['subject']}",
                        highlight=False,
                    )
        elif ns.action == "show":
            with read(engine) as conn:
                print(json.dumps(crl.show_x509(conn, ns.serial), indent=2))
        else:
            with engine.begin() as conn:
                crl.revoke_x509(conn, ns.serial, "operator")
            console.print(f"revoked {ns.serial}")
    finally:
        engine.dispose()
    return 0


def cmd_keys(ns: argparse.Namespace) -> int:
    from airlock.cli import _settings
    from airlock.core.errors import BadInput
    from airlock.credentials.keys import generate_signing_key, load_signing_keys, retire_signing_key
    from airlock.credentials.tokens import KEYS_RECHECK_S

    settings = _settings(ns)
    if ns.action == "rotate":
        key = generate_signing_key(settings.keys_dir)
        console.print(
            f"new signing key {key.kid}: the gateway signs with it within {KEYS_RECHECK_S:.0f} s; the older "
            "keys stay in the JWKS and still verify tokens in flight (`airlock keys retire KID` later)"
        )
        return 0
    if ns.action == "retire":
        if not ns.kid:
            raise BadInput("`airlock keys retire` needs a key id")
        try:
            retire_signing_key(settings.keys_dir, ns.kid)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        console.print(f"retired {ns.kid}")
        return 0
    for i, key in enumerate(load_signing_keys(settings.keys_dir)):
        console.print(f"{key.kid} {'signs' if i == 0 else 'verifies'}", highlight=False)
    return 0
