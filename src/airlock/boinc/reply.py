"""The BOINC scheduler reply, rendered from typed values.

What the stock client needs and accepts (shared/notes/boinc-protocol.md, checked there with Debian's
boinc-client 7.20.5; BOINC client/cs_scheduler.cpp): the project's `<code_sign_key>` on first contact only,
each `<app>` with its signed `<file_info>`s and `<app_version>`, input `<file_info>`s with size and MD5 so
the client verifies them, `<workunit>`s referring to their inputs with `<copy_file/>`, output `<file_info>`s
with an upload URL and a `<max_nbytes>` (required: 0 fails the task), and `<result>`s with their report
deadline. `<result_ack>` for each accepted report, `<result_abort>` for tasks to kill, `<message>`s for
the volunteer. Every value is escaped (tested by parsing replies back with hostile values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from airlock.boinc.apps import ANY_PLATFORM, AppVersion

_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


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


class _Xml:
    """A string builder for the reply: every text value goes through `escape` (a scheduler RPC renders
    one per request, and this is a tenth of ElementTree's cost)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, text: object) -> None:
        self.parts.append(f"<{tag}>{escape(str(text))}</{tag}>\n")

    def flag(self, tag: str) -> None:
        self.parts.append(f"<{tag}/>\n")

    def open(self, tag: str) -> None:
        self.parts.append(f"<{tag}>\n")

    def close(self, tag: str) -> None:
        self.parts.append(f"</{tag}>\n")


def render_reply(reply: SchedulerReply) -> bytes:
    x = _Xml()
    x.open("scheduler_reply")
    x.add("project_name", reply.project_name)
    x.add("master_url", reply.master_url)
    if reply.hostid:
        x.add("hostid", reply.hostid)
    if reply.userid:
        x.add("userid", reply.userid)
    if reply.user_name:
        x.add("user_name", reply.user_name)
    x.add("request_delay", f"{reply.request_delay:f}")
    if reply.next_rpc_delay is not None:
        x.add("next_rpc_delay", f"{reply.next_rpc_delay:f}")
    for m in reply.messages:
        x.parts.append(f"<message priority={quoteattr(m.priority)}>{escape(m.text)}</message>\n")
    if reply.code_sign_key is not None:
        x.add("code_sign_key", reply.code_sign_key)
    if reply.project_specific is not None:
        x.open("project_preferences")
        x.open("project_specific")
        for tag, value in reply.project_specific.items():
            if not _TAG.match(tag):
                raise ValueError(f"{tag!r} is not an element name")
            x.add(tag, value)
        x.close("project_specific")
        x.close("project_preferences")
    for version, base_url in reply.app_versions:
        _app_version(x, version, base_url.rstrip("/"))
    for wu in reply.workunits:
        _workunit(x, wu)
    for result in reply.results:
        _result(x, result)
    for name in reply.acks:
        x.open("result_ack")
        x.add("name", name)
        x.close("result_ack")
    for name in reply.aborts:
        x.open("result_abort")
        x.add("name", name)
        x.close("result_abort")
    x.close("scheduler_reply")
    return "".join(x.parts).encode()


def _app_version(x: _Xml, version: AppVersion, base_url: str) -> None:
    x.open("app")
    x.add("name", version.app)
    x.add("user_friendly_name", version.app)
    x.close("app")
    for f in version.files:
        x.open("file_info")
        x.add("name", f.name)
        x.add("url", f"{base_url}/{f.name}")
        x.flag("executable")
        x.add("nbytes", f"{f.size:f}")
        x.add("md5_cksum", f.md5)
        x.add("file_signature", "\n" + f.signature)
        x.close("file_info")
    x.open("app_version")
    x.add("app_name", version.app)
    x.add("version_num", version.version)
    if version.platform != ANY_PLATFORM:
        x.add("platform", version.platform)
    for f in version.files:
        x.open("file_ref")
        x.add("file_name", f.name)
        if f.main_program:
            x.flag("main_program")
        else:
            x.add("open_name", f.name)
            x.flag("copy_file")
        x.close("file_ref")
    x.close("app_version")


def _workunit(x: _Xml, wu: Workunit) -> None:
    for f in wu.inputs:
        x.open("file_info")
        x.add("name", f.name)
        x.add("url", f.url)
        x.add("nbytes", f"{f.nbytes:f}")
        x.add("md5_cksum", f.md5)
        x.close("file_info")
    x.open("workunit")
    x.add("name", wu.name)
    x.add("app_name", wu.app)
    if wu.command_line:
        x.add("command_line", wu.command_line)
    x.add("rsc_fpops_est", f"{wu.rsc_fpops_est:f}")
    x.add("rsc_fpops_bound", f"{wu.rsc_fpops_bound:f}")
    x.add("rsc_memory_bound", f"{wu.rsc_memory_bound:f}")
    x.add("rsc_disk_bound", f"{wu.rsc_disk_bound:f}")
    for f in wu.inputs:
        x.open("file_ref")
        x.add("file_name", f.name)
        x.add("open_name", f.open_name)
        x.flag("copy_file")
        x.close("file_ref")
    x.close("workunit")


def _result(x: _Xml, result: Result) -> None:
    for f in result.outputs:
        if f.max_nbytes <= 0:
            raise ValueError(f"{f.name}: an output needs a positive max_nbytes (0 fails the task)")
        x.open("file_info")
        x.add("name", f.name)
        x.flag("generated_locally")
        x.flag("upload_when_present")
        x.add("url", f.upload_url)
        x.add("max_nbytes", f"{f.max_nbytes:f}")
        x.close("file_info")
    x.open("result")
    x.add("name", result.name)
    x.add("wu_name", result.workunit)
    x.add("report_deadline", result.report_deadline)
    x.flag("report_immediately")
    for f in result.outputs:
        x.open("file_ref")
        x.add("file_name", f.name)
        x.add("open_name", f.open_name)
        x.flag("copy_file")
        x.close("file_ref")
    x.close("result")
