"""The project's small public documents: the master page, `get_project_config.php` and the replies of
`lookup_account.php` (BOINC html/user/*.php; shared/notes/boinc-protocol.md)."""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET

from airlock.boinc.project import BoincProject

MIN_PASSWORD_LENGTH = 8
# BOINC error numbers (lib/error_numbers.h)
ERR_DB_NOT_FOUND = -136
ERR_BAD_PASSWD = -206


def master_page(project: BoincProject) -> str:
    """The page a client fetches after attaching: the scheduler link must be one line, rel before href."""
    name = html.escape(project.settings.boinc_project_name)
    scheduler = html.escape(project.scheduler_url, quote=True)
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        f"<title>{name}</title>\n"
        f'<link rel="boinc_scheduler" href="{scheduler}">\n'
        "</head>\n<body>\n"
        f"<h1>{name}</h1>\n"
        "<p>A BOINC project served by an Airlock gateway. Attach the BOINC client with the project URL "
        "of this page and the account key the project gave you.</p>\n"
        f"<!-- <scheduler>{scheduler}</scheduler> -->\n"
        "</body>\n</html>\n"
    )


def _xml(root: ET.Element) -> bytes:
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return body + b"\n"


def project_config(project: BoincProject) -> bytes:
    """What the BOINC Manager's "add project" wizard reads. Accounts are made by the operator (or the
    gateway's own registration API), never through the client."""
    root = ET.Element("project_config")
    ET.SubElement(root, "name").text = project.settings.boinc_project_name
    ET.SubElement(root, "master_url").text = project.master_url
    ET.SubElement(root, "web_rpc_url_base").text = project.master_url
    ET.SubElement(root, "min_passwd_length").text = str(MIN_PASSWORD_LENGTH)
    ET.SubElement(root, "account_creation_disabled")
    ET.SubElement(root, "client_account_creation_disabled")
    platforms = ET.SubElement(root, "platforms")
    for version in project.all_versions():
        p = ET.SubElement(platforms, "platform")
        ET.SubElement(p, "platform_name").text = version.platform
        ET.SubElement(p, "user_friendly_name").text = f"{version.app} {version.version / 100:.2f}"
    return _xml(root)


def account_out(authenticator: str) -> bytes:
    root = ET.Element("account_out")
    ET.SubElement(root, "authenticator").text = authenticator
    return _xml(root)


def error(number: int, message: str) -> bytes:
    root = ET.Element("error")
    ET.SubElement(root, "error_num").text = str(number)
    ET.SubElement(root, "error_msg").text = message
    return _xml(root)
