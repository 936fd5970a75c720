"""The BOINC scheduler reply, rendered from typed values.

What the stock client needs and accepts (shared/notes/boinc-protocol.md, checked there with Debian's
boinc-client 7.20.5; BOINC client/cs_scheduler.cpp): the project's `<code_sign_key>` on first contact only,
each `<app>` with its signed `<file_info>`s and `<app_version>`, input `<file_info>`s with size and MD5 so
the client verifies them, `<workunit>`s referring to their inputs with `<copy_file/>`, output `<file_info>`s
with an upload URL and a `<max_nbytes>` (required: 0 fails the task), and `<result>`s with their report
deadline. `<result_ack>` for each accepted report, `<result_abort>` for tasks to kill, `<message>`s for
the volunteer. Built with ElementTree, so every value is escaped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from airlock.boinc.apps import ANY_PLATFORM, AppVersion


@dataclass(frozen=True)
class InputFile:
    name: str  # the physical name, unique in the project (e.g. the digest)
    open_name: str  # the name the app opens
    url: str
    nbytes: int
    md5: str


@dataclass(frozen=True)
class OutputFile:
    name: str  # the physical name, unique per result
    open_name: str
    upload_url: str
    max_nbytes: int


@dataclass(frozen=True)
class Workunit:
    name: str
    app: str
    inputs: tuple[InputFile, ...]
    command_line: str = ""
    rsc_fpops_est: float = 3.6e12
    rsc_fpops_bound: float = 3.6e13
    rsc_memory_bound: float = 2**30
    rsc_disk_bound: float = 2**30


@dataclass(frozen=True)
class Result:
    name: str
    workunit: str
    report_deadline: int  # unix time
    outputs: tuple[OutputFile, ...]


@dataclass(frozen=True)
class Message:
    text: str
    priority: str = "low"  # "low", "high" (shown as a notice) or "notice"


@dataclass
class SchedulerReply:
    project_name: str
    master_url: str
    hostid: int = 0
    userid: int = 0
    user_name: str = ""
    request_delay: float = 0.0  # seconds before the client may ask again
    next_rpc_delay: float | None = None  # ask again after this long even with nothing to do
    code_sign_key: str | None = None  # only when the request carried none (first contact)
    app_versions: list[tuple[AppVersion, str]] = field(default_factory=list)  # (version, files' base URL)
    workunits: list[Workunit] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    # <project_specific> preferences, one element per item: the client passes them to every job in
    # init_data.xml, and rewrites them in running jobs when a later reply changes them
    project_specific: dict[str, str] | None = None


def _add(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def _flag(parent: ET.Element, tag: str) -> None:
    ET.SubElement(parent, tag)


def render_reply(reply: SchedulerReply) -> bytes:
    root = ET.Element("scheduler_reply")
    _add(root, "project_name", reply.project_name)
    _add(root, "master_url", reply.master_url)
    if reply.hostid:
        _add(root, "hostid", reply.hostid)
    if reply.userid:
        _add(root, "userid", reply.userid)
    if reply.user_name:
        _add(root, "user_name", reply.user_name)
    _add(root, "request_delay", f"{reply.request_delay:f}")
    if reply.next_rpc_delay is not None:
        _add(root, "next_rpc_delay", f"{reply.next_rpc_delay:f}")
    for m in reply.messages:
        _add(root, "message", m.text).set("priority", m.priority)
    if reply.code_sign_key is not None:
        _add(root, "code_sign_key", reply.code_sign_key)
    if reply.project_specific is not None:
        prefs = _add(root, "project_preferences")
        specific = _add(prefs, "project_specific")
        for tag, value in reply.project_specific.items():
            _add(specific, tag, value)
    for version, base_url in reply.app_versions:
        _app_version(root, version, base_url.rstrip("/"))
    for wu in reply.workunits:
        _workunit(root, wu)
    for result in reply.results:
        _result(root, result)
    for name in reply.acks:
        _add(_add(root, "result_ack"), "name", name)
    for name in reply.aborts:
        _add(_add(root, "result_abort"), "name", name)
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return body + b"\n"


def _app_version(root: ET.Element, version: AppVersion, base_url: str) -> None:
    app = _add(root, "app")
    _add(app, "name", version.app)
    _add(app, "user_friendly_name", version.app)
    for f in version.files:
        fi = _add(root, "file_info")
        _add(fi, "name", f.name)
        _add(fi, "url", f"{base_url}/{f.name}")
        _flag(fi, "executable")
        _add(fi, "nbytes", f"{f.size:f}")
        _add(fi, "md5_cksum", f.md5)
        _add(fi, "file_signature", "\n" + f.signature)
    av = _add(root, "app_version")
    _add(av, "app_name", version.app)
    _add(av, "version_num", version.version)
    if version.platform != ANY_PLATFORM:
        _add(av, "platform", version.platform)
    for f in version.files:
        ref = _add(av, "file_ref")
        _add(ref, "file_name", f.name)
        if f.main_program:
            _flag(ref, "main_program")
        else:
            _add(ref, "open_name", f.name)
            _flag(ref, "copy_file")


def _workunit(root: ET.Element, wu: Workunit) -> None:
    for f in wu.inputs:
        fi = _add(root, "file_info")
        _add(fi, "name", f.name)
        _add(fi, "url", f.url)
        _add(fi, "nbytes", f"{f.nbytes:f}")
        _add(fi, "md5_cksum", f.md5)
    el = _add(root, "workunit")
    _add(el, "name", wu.name)
    _add(el, "app_name", wu.app)
    if wu.command_line:
        _add(el, "command_line", wu.command_line)
    _add(el, "rsc_fpops_est", f"{wu.rsc_fpops_est:f}")
    _add(el, "rsc_fpops_bound", f"{wu.rsc_fpops_bound:f}")
    _add(el, "rsc_memory_bound", f"{wu.rsc_memory_bound:f}")
    _add(el, "rsc_disk_bound", f"{wu.rsc_disk_bound:f}")
    for f in wu.inputs:
        ref = _add(el, "file_ref")
        _add(ref, "file_name", f.name)
        _add(ref, "open_name", f.open_name)
        _flag(ref, "copy_file")


def _result(root: ET.Element, result: Result) -> None:
    for f in result.outputs:
        if f.max_nbytes <= 0:
            raise ValueError(f"{f.name}: an output needs a positive max_nbytes (0 fails the task)")
        fi = _add(root, "file_info")
        _add(fi, "name", f.name)
        _flag(fi, "generated_locally")
        _flag(fi, "upload_when_present")
        _add(fi, "url", f.upload_url)
        _add(fi, "max_nbytes", f"{f.max_nbytes:f}")
    el = _add(root, "result")
    _add(el, "name", result.name)
    _add(el, "wu_name", result.workunit)
    _add(el, "report_deadline", result.report_deadline)
    _flag(el, "report_immediately")
    for f in result.outputs:
        ref = _add(el, "file_ref")
        _add(ref, "file_name", f.name)
        _add(ref, "open_name", f.open_name)
        _flag(ref, "copy_file")
