"""A scheduler request rendered as the stock client writes it (client/cs_scheduler.cpp): the inverse of
`protocol.parse_scheduler_request`, for the benchmark, the tests and anyone probing a gateway without a
BOINC client. Values are escaped by ElementTree; stderr goes in CDATA as the client sends it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from airlock.boinc.protocol import ReportedResult, SchedulerRequest


def _add(parent: ET.Element, tag: str, text: object) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = str(text)
    return el


def _result(root: ET.Element, r: ReportedResult) -> None:
    el = ET.SubElement(root, "result")
    _add(el, "name", r.name)
    _add(el, "final_cpu_time", f"{r.final_cpu_time:f}")
    _add(el, "final_elapsed_time", f"{r.final_elapsed_time:f}")
    _add(el, "exit_status", r.exit_status)
    _add(el, "state", r.state)
    _add(el, "stderr_out", r.stderr_out)
    for f in r.files:
        fi = ET.SubElement(el, "file_info")
        _add(fi, "name", f.name)
        _add(fi, "nbytes", f"{f.nbytes:f}")
        _add(fi, "md5_cksum", f.md5)


def render_request(req: SchedulerRequest, code_sign_key: str | None = None) -> bytes:
    root = ET.Element("scheduler_request")
    _add(root, "authenticator", req.authenticator)
    _add(root, "hostid", req.hostid)
    _add(root, "rpc_seqno", req.rpc_seqno)
    major, minor, release = req.client_version
    _add(root, "core_client_major_version", major)
    _add(root, "core_client_minor_version", minor)
    _add(root, "core_client_release", release)
    _add(root, "work_req_seconds", f"{req.work_req_seconds:f}")
    _add(root, "platform_name", req.platform_name)
    for p in req.alternate_platforms:
        _add(ET.SubElement(root, "alt_platform"), "name", p)
    if req.has_code_sign_key:
        _add(root, "code_sign_key", code_sign_key or "1024\n.\n")
    h = ET.SubElement(root, "host_info")
    _add(h, "host_cpid", req.host.host_cpid)
    _add(h, "domain_name", req.host.domain_name)
    _add(h, "p_ncpus", req.host.p_ncpus)
    _add(h, "p_model", req.host.p_model)
    _add(h, "m_nbytes", f"{req.host.m_nbytes:f}")
    _add(h, "d_free", f"{req.host.d_free:f}")
    _add(h, "os_name", req.host.os_name)
    _add(h, "os_version", req.host.os_version)
    for r in req.results:
        _result(root, r)
    others = ET.SubElement(root, "other_results")
    for name in req.other_results:
        _add(ET.SubElement(others, "other_result"), "name", name)
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8")
    return body + b"\n"
