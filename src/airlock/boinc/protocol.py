"""The BOINC scheduler request, parsed safely into typed values.

The body comes from an untrusted client: it is size-capped before parsing and parsed with defusedxml (no
DTDs, no entity expansion, no external references). Anything else than a well-formed
`<scheduler_request>` with the values we use raises `BoincProtocolError` with a message for the volunteer;
no other exception escapes. Elements we do not use are ignored, as the BOINC server does. Field names
follow the client (BOINC client/cs_scheduler.cpp; shared/notes/boinc-protocol.md).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

MAX_REQUEST_BYTES = 4 * 2**20  # a client with hundreds of tasks in progress stays far below
MAX_STDERR_CHARS = 64 * 1024  # the client sends the last 63 KB of stderr.txt
MAX_RESULTS = 5000
_RESULT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_AUTHENTICATOR = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class BoincProtocolError(ValueError):
    """A request we cannot serve; the message is for the volunteer (in the reply's <message>)."""


@dataclass(frozen=True)
class ReportedFile:
    name: str
    nbytes: float
    md5: str


@dataclass(frozen=True)
class ReportedResult:
    name: str
    state: int  # 5 uploaded OK, 3 compute error, 1 download error, 6 aborted
    exit_status: int
    final_cpu_time: float
    final_elapsed_time: float
    stderr_out: str
    files: tuple[ReportedFile, ...]


@dataclass(frozen=True)
class HostInfo:
    host_cpid: str = ""
    domain_name: str = ""
    p_ncpus: int = 1
    p_model: str = ""
    m_nbytes: float = 0.0
    d_free: float = 0.0
    os_name: str = ""
    os_version: str = ""


@dataclass(frozen=True)
class SchedulerRequest:
    authenticator: str
    hostid: int
    rpc_seqno: int
    platform_name: str
    client_version: tuple[int, int, int]
    work_req_seconds: float
    host: HostInfo
    results: tuple[ReportedResult, ...] = ()
    other_results: tuple[str, ...] = ()  # tasks the client still holds (for resending lost work)
    has_code_sign_key: bool = False
    alternate_platforms: tuple[str, ...] = field(default=())


def _text(el: ET.Element | None, tag: str, default: str = "", limit: int = 4096) -> str:
    child = el.find(tag) if el is not None else None
    if child is None:
        return default
    value = (child.text or "").strip()
    if len(value) > limit:
        raise BoincProtocolError(f"<{tag}> is longer than {limit} characters")
    return value


def _int(el: ET.Element | None, tag: str, default: int = 0) -> int:
    raw = _text(el, tag)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        try:
            as_float = float(raw)
        except ValueError:
            raise BoincProtocolError(f"<{tag}> is not a number: {raw[:40]!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise BoincProtocolError(f"<{tag}> is not an integer: {raw[:40]!r}") from None
        value = int(as_float)
    if abs(value) > 2**62:
        raise BoincProtocolError(f"<{tag}> is out of range")
    return value


def _float(el: ET.Element | None, tag: str, default: float = 0.0) -> float:
    raw = _text(el, tag)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BoincProtocolError(f"<{tag}> is not a number: {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise BoincProtocolError(f"<{tag}> is not a finite number")
    return value


def _result_name(raw: str, where: str) -> str:
    if not _RESULT_NAME.match(raw):
        raise BoincProtocolError(f"{where}: {raw[:60]!r} is not a result name")
    return raw


def _reported(el: ET.Element) -> ReportedResult:
    files = tuple(
        ReportedFile(_text(f, "name", limit=255), _float(f, "nbytes"), _text(f, "md5_cksum", limit=64))
        for f in el.findall("file_info")
    )
    return ReportedResult(
        name=_result_name(_text(el, "name", limit=255), "<result>"),
        state=_int(el, "state"),
        exit_status=_int(el, "exit_status"),
        final_cpu_time=_float(el, "final_cpu_time"),
        final_elapsed_time=_float(el, "final_elapsed_time"),
        stderr_out=_text(el, "stderr_out", limit=MAX_STDERR_CHARS * 2)[-MAX_STDERR_CHARS:],
        files=files,
    )


def parse_scheduler_request(body: bytes) -> SchedulerRequest:
    if len(body) > MAX_REQUEST_BYTES:
        raise BoincProtocolError(f"the scheduler request is over {MAX_REQUEST_BYTES} bytes")
    try:
        root = fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise BoincProtocolError(f"the scheduler request uses forbidden XML ({type(exc).__name__})") from None
    except (ET.ParseError, ValueError, UnicodeError) as exc:
        raise BoincProtocolError(f"the scheduler request is not well-formed XML: {exc}") from None
    if root.tag != "scheduler_request":
        raise BoincProtocolError(f"expected <scheduler_request>, got <{str(root.tag)[:40]}>")
    authenticator = _text(root, "authenticator", limit=256)
    if not _AUTHENTICATOR.match(authenticator):
        raise BoincProtocolError("the request carries no valid <authenticator>")
    results = root.findall("result")
    if len(results) > MAX_RESULTS:
        raise BoincProtocolError(f"more than {MAX_RESULTS} results in one request")
    other = root.find("other_results")
    host = root.find("host_info")
    return SchedulerRequest(
        authenticator=authenticator,
        hostid=max(0, _int(root, "hostid")),
        rpc_seqno=_int(root, "rpc_seqno"),
        platform_name=_text(root, "platform_name", limit=256),
        client_version=(
            _int(root, "core_client_major_version"),
            _int(root, "core_client_minor_version"),
            _int(root, "core_client_release"),
        ),
        work_req_seconds=max(0.0, _float(root, "work_req_seconds")),
        host=HostInfo(
            host_cpid=_text(host, "host_cpid", limit=64),
            domain_name=_text(host, "domain_name", limit=256),
            p_ncpus=max(1, _int(host, "p_ncpus", 1)),
            p_model=_text(host, "p_model", limit=256),
            m_nbytes=max(0.0, _float(host, "m_nbytes")),
            d_free=max(0.0, _float(host, "d_free")),
            os_name=_text(host, "os_name", limit=256),
            os_version=_text(host, "os_version", limit=256),
        ),
        results=tuple(_reported(r) for r in results),
        other_results=tuple(
            _result_name(_text(r, "name", limit=255), "<other_results>")
            for r in (other.findall("other_result") if other is not None else [])
        ),
        has_code_sign_key=root.find("code_sign_key") is not None,
        alternate_platforms=tuple(
            _text(p, "name", limit=256) for p in root.findall("alt_platform") if _text(p, "name", limit=256)
        ),
    )
