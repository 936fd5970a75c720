"""The CA as a grid X509_CERT_DIR: `<hash>.0` certificates, `<hash>.signing_policy` and the issuing CA's
CRL as `<hash>.r0`, for relying parties (XRootD GSI, VOMS tools, `openssl verify -CApath`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from airlock.credentials.ca import CA, slash_dn

PEM = serialization.Encoding.PEM


def subject_hash(cert: x509.Certificate) -> str:
    """OpenSSL's subject hash (its canonical name encoding is OpenSSL's own: ask openssl)."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash"],
        input=cert.public_bytes(PEM),
        capture_output=True,
        check=True,
        timeout=30,
    )
    return out.stdout.decode().strip()


def signing_policy(ca: x509.Certificate, subjects: str) -> str:
    return (
        f"access_id_CA      X509         '{slash_dn(ca.subject)}'\n"
        "pos_rights        globus        CA:sign\n"
        f"cond_subjects     globus       '\"{subjects}\"'\n"
    )


def export_cert_dir(ca: CA, crl: x509.CertificateRevocationList, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cert, subjects in ((ca.root, slash_dn(ca.cert.subject)), (ca.cert, ca.dn_base + "/*")):
        h = subject_hash(cert)
        (out / f"{h}.0").write_bytes(cert.public_bytes(PEM))
        (out / f"{h}.signing_policy").write_text(signing_policy(cert, subjects))
        written += [out / f"{h}.0", out / f"{h}.signing_policy"]
    h = subject_hash(ca.cert)
    (out / f"{h}.r0").write_bytes(crl.public_bytes(PEM))
    written.append(out / f"{h}.r0")
    return written
