"""BOINC code signing: the key text and file signatures in the formats the stock client reads, checked
with openssl as an independent implementation, and app versions published without the private key."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from airlock.boinc.apps import PUBLIC_KEY_FILE, app_versions, load_app_version, sign_app
from airlock.boinc.signing import (
    SignatureError,
    file_md5_hex,
    generate_key,
    load_private,
    parse_public_key_text,
    private_pem,
    sign_file,
    verify_file,
)


def airlock(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    env["COLUMNS"] = "300"  # rich wraps at the terminal width
    return subprocess.run(
        [sys.executable, "-m", "airlock", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline") / "signing"
    r = airlock("boinc", "keygen", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_keygen_writes_a_private_key_0600_and_the_public_key_text(keys: Path) -> None:
    private = keys / "code_sign_private.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private(private)
    assert key.key_size == 1024
    lines = (keys / "code_sign_public").read_text().splitlines()
    assert lines[0] == "1024" and lines[-1] == "."
    assert [len(line) for line in lines[1:-1]] == [64] * 8  # 256 bytes, 32 per line, hex
    block = bytes.fromhex("".join(lines[1:-1]))
    numbers = key.public_key().public_numbers()
    assert int.from_bytes(block[:128], "big") == numbers.n and int.from_bytes(block[128:], "big") == 65537
    assert parse_public_key_text("\n".join(lines)).public_numbers() == numbers
    again = airlock("boinc", "keygen", "--out", str(keys))
    assert again.returncode == 1 and "not overwriting" in again.stdout


def test_signatures_verify_here_and_with_openssl(keys: Path, tmp_path: Path) -> None:
    key = load_private(keys / "code_sign_private.pem")
    app = tmp_path / "wrapper.sh"
    app.write_bytes(b"#!/bin/sh\necho hello\n")
    signature = sign_file(key, app)
    lines = signature.splitlines()
    assert lines[-1] == "." and [len(line) for line in lines[:-1]] == [64] * 4  # 128 bytes
    assert verify_file(key.public_key(), app, signature)
    # openssl, independently: the raw RSA public operation must give back the MD5 as hex text.
    pub_pem = tmp_path / "pub.pem"
    pub_pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sig_bin = tmp_path / "sig.bin"
    sig_bin.write_bytes(bytes.fromhex("".join(lines[:-1])))
    out = subprocess.run(
        ["openssl", "pkeyutl", "-verifyrecover", "-pubin", "-inkey", str(pub_pem), "-in", str(sig_bin),
         "-pkeyopt", "rsa_padding_mode:pkcs1"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert out.stdout == file_md5_hex(app).encode("ascii")
    # A changed file, another key, or a damaged signature do not verify.
    app.write_bytes(b"#!/bin/sh\necho tampered\n")
    assert not verify_file(key.public_key(), app, signature)
    app.write_bytes(b"#!/bin/sh\necho hello\n")
    assert not verify_file(generate_key().public_key(), app, signature)
    assert not verify_file(key.public_key(), app, signature.replace(lines[0], "0" * 64))
    assert not verify_file(key.public_key(), app, "not hex\n.\n")


def test_sign_app_publishes_only_public_material(keys: Path, tmp_path: Path) -> None:
    data = tmp_path / "gateway"
    files = []
    for name, body in (
        ("airlock_wrapper", b"#!/bin/sh\nexec python3 -m airlock.boinc.app\n"),
        ("job.json", b"{}"),
    ):
        (tmp_path / name).write_bytes(body)
        files.append(tmp_path / name)
    r = airlock(
        "boinc", "sign-app", "--data-dir", str(data), "--key", str(keys / "code_sign_private.pem"),
        "--app", "airlock_wrapper", "--version", "100", "--platform", "x86_64-pc-linux-gnu",
        *map(str, files),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    [version] = app_versions(data)
    assert (version.app, version.version, version.platform) == ("airlock_wrapper", 100, "x86_64-pc-linux-gnu")
    assert [(f.name, f.main_program) for f in version.files] == [
        ("airlock_wrapper", True),
        ("job.json", False),
    ]
    assert (data / "boinc" / PUBLIC_KEY_FILE).read_text() == (keys / "code_sign_public").read_text()
    # Invariant 1: nothing of the private key in what the gateway holds.
    key = load_private(keys / "code_sign_private.pem")
    d_hex = format(key.private_numbers().d, "x")
    for path in data.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"PRIVATE KEY" not in content and d_hex.encode() not in content, path
    # Released versions never change; the key must be the one clients already trust; the private key
    # may not live in the data folder.
    again = airlock(
        "boinc", "sign-app", "--data-dir", str(data), "--key", str(keys / "code_sign_private.pem"),
        "--app", "airlock_wrapper", "--version", "100", "--platform", "x86_64-pc-linux-gnu", str(files[0]),
    )  # fmt: skip
    assert again.returncode == 1 and "never change" in again.stdout
    other = tmp_path / "other.pem"
    other.write_bytes(private_pem(generate_key()))
    with pytest.raises(SignatureError, match="another key"):
        sign_app(other, data, "airlock_wrapper", 101, [files[0]])
    inside = data / "leaked.pem"
    shutil.copy(keys / "code_sign_private.pem", inside)
    with pytest.raises(ValueError, match="keep it offline"):
        sign_app(inside, data, "airlock_wrapper", 102, [files[0]])
    inside.unlink()
    with pytest.raises(ValueError, match="main program"):
        sign_app(keys / "code_sign_private.pem", data, "airlock_wrapper", 103, [files[0]], main="nope")
    assert not (data / "boinc" / "apps" / "airlock_wrapper" / "103").exists()
    # A published file changed afterwards no longer loads.
    published = version.folder / "job.json"
    published.write_bytes(b'{"evil": true}')
    with pytest.raises(SignatureError, match="does not verify"):
        load_app_version(data, version.folder)
    manifest = json.loads((version.folder / "app_version.json").read_text())
    assert manifest["files"][1]["md5"] == file_md5_hex(files[1])
