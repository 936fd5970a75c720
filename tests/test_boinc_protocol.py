"""The scheduler-request parser: realistic requests parse into typed values; anything else, including
garbage, hostile XML and out-of-range values, is a BoincProtocolError and never another exception."""

from __future__ import annotations

import contextlib
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock.boinc.protocol import MAX_REQUEST_BYTES, BoincProtocolError, parse_scheduler_request

REQUEST = """<scheduler_request>
    <authenticator>{auth}</authenticator>
    <hostid>{hostid}</hostid>
    <rpc_seqno>12</rpc_seqno>
    <core_client_major_version>7</core_client_major_version>
    <core_client_minor_version>20</core_client_minor_version>
    <core_client_release>5</core_client_release>
    <work_req_seconds>{work:.6f}</work_req_seconds>
    <cpu_req_secs>8640.000000</cpu_req_secs>
    <platform_name>x86_64-pc-linux-gnu</platform_name>
    <alt_platform><name>i686-pc-linux-gnu</name></alt_platform>
    <code_sign_key>1024
abcdef
.
</code_sign_key>
    <host_info>
        <host_cpid>9f3b2c4d5e6f708192a3b4c5d6e7f809</host_cpid>
        <p_ncpus>{ncpus}</p_ncpus>
        <p_model>Intel(R) Xeon(R) CPU @ 2.20GHz</p_model>
        <m_nbytes>{mem:.6f}</m_nbytes>
        <d_free>{disk:.6f}</d_free>
        <os_name>Linux Debian</os_name>
        <os_version>Debian GNU/Linux 12 (bookworm) [6.1.0-26-amd64]</os_version>
    </host_info>
    <time_stats><on_frac>0.99</on_frac></time_stats>
    <net_stats><bwup>123456.0</bwup></net_stats>
{results}
    <other_results>
{others}
    </other_results>
</scheduler_request>
"""

RESULT = """    <result>
        <name>{name}</name>
        <final_cpu_time>{cpu:.6f}</final_cpu_time>
        <final_elapsed_time>12.500000</final_elapsed_time>
        <exit_status>{exit}</exit_status>
        <state>5</state>
        <platform>x86_64-pc-linux-gnu</platform>
        <version_num>100</version_num>
        <stderr_out><![CDATA[{stderr}]]></stderr_out>
        <file_info>
            <name>{name}_0</name>
            <nbytes>4096.000000</nbytes>
            <max_nbytes>1048576.000000</max_nbytes>
            <md5_cksum>0cc175b9c0f1b6a831c399e269772661</md5_cksum>
        </file_info>
    </result>"""


def request(
    *, auth: str = "0123456789abcdef0123456789abcdef", hostid: int = 7, work: float = 8640.0,
    ncpus: int = 4, mem: float = 8e9, disk: float = 5e10, results: list[dict[str, object]] | None = None,
    others: list[str] | None = None,
) -> bytes:  # fmt: skip
    body = REQUEST.format(
        auth=auth, hostid=hostid, work=work, ncpus=ncpus, mem=mem, disk=disk,
        results="\n".join(RESULT.format(**r) for r in (results or [])),
        others="\n".join(f"<other_result><name>{n}</name></other_result>" for n in (others or [])),
    )  # fmt: skip
    return body.encode()


def test_a_realistic_request_parses_into_typed_values() -> None:
    req = parse_scheduler_request(
        request(
            results=[
                {"name": "job12_task34_ab12cd34", "cpu": 11.25, "exit": 0, "stderr": "done <ok> & fine"}
            ],
            others=["job12_task35_ffee0011"],
        )
    )
    assert req.authenticator == "0123456789abcdef0123456789abcdef"
    assert (req.hostid, req.rpc_seqno, req.client_version) == (7, 12, (7, 20, 5))
    assert req.platform_name == "x86_64-pc-linux-gnu" and req.alternate_platforms == ("i686-pc-linux-gnu",)
    assert req.work_req_seconds == 8640.0 and req.has_code_sign_key
    assert (req.host.p_ncpus, req.host.m_nbytes, req.host.d_free) == (4, 8e9, 5e10)
    [r] = req.results
    assert (r.name, r.state, r.exit_status, r.final_cpu_time) == ("job12_task34_ab12cd34", 5, 0, 11.25)
    assert r.stderr_out == "done <ok> & fine"
    assert [(f.name, f.nbytes, f.md5) for f in r.files] == [
        ("job12_task34_ab12cd34_0", 4096.0, "0cc175b9c0f1b6a831c399e269772661")
    ]
    assert req.other_results == ("job12_task35_ffee0011",)


HOSTILE = [
    (b"", "not well-formed"),
    (b"<scheduler_request><authenticator>abc", "not well-formed"),
    (b"<html><body>hi</body></html>", "expected <scheduler_request>"),
    (b"<scheduler_request></scheduler_request>", "authenticator"),
    (b"<scheduler_request><authenticator>a b</authenticator></scheduler_request>", "authenticator"),
    (  # billion laughs
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
        b"<scheduler_request><authenticator>&lol2;</authenticator></scheduler_request>",
        "forbidden XML",
    ),
    (  # external entity: a file of the gateway's
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<scheduler_request><authenticator>&x;</authenticator></scheduler_request>",
        "forbidden XML",
    ),
    (request().replace(b"<hostid>7</hostid>", b"<hostid>seven</hostid>"), "<hostid> is not a number"),
    (request().replace(b"<hostid>7</hostid>", b"<hostid>1e300</hostid>"), "out of range"),
    (request(work=float("inf")), "not a finite number"),
    (request(results=[{"name": "../../etc", "cpu": 1, "exit": 0, "stderr": ""}]), "not a result name"),
    (request(others=["x y"]), "not a result name"),
    (b"<scheduler_request>" + b" " * (MAX_REQUEST_BYTES + 1), "over"),
]


@pytest.mark.parametrize(("body", "message"), HOSTILE)
def test_bad_requests_get_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(BoincProtocolError, match=message):
        parse_scheduler_request(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_else(body: bytes) -> None:
    with contextlib.suppress(BoincProtocolError):
        parse_scheduler_request(body)


_xml_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["authenticator", "hostid", "p_ncpus", "work_req_seconds", "result", "name",
                              "other_results", "other_result", "host_info", "m_nbytes", "exit_status"]),
             max_size=12),
    st.lists(_xml_text, max_size=12),
)  # fmt: skip
def test_garbled_but_well_formed_requests_never_raise_anything_else(
    tags: list[str], texts: list[str]
) -> None:
    inner = "".join(f"<{t}>{escape(x)}</{t}>" for t, x in zip(tags, texts, strict=False))
    with contextlib.suppress(BoincProtocolError):
        parse_scheduler_request(f"<scheduler_request>{inner}</scheduler_request>".encode())


@settings(max_examples=200, deadline=None)
@given(
    hostid=st.integers(0, 2**31 - 1),
    ncpus=st.integers(1, 1024),
    work=st.floats(0, 1e7, allow_nan=False),
    names=st.lists(st.from_regex(r"^[A-Za-z0-9_.-]{1,40}$", fullmatch=True), max_size=5, unique=True),
    exit_code=st.integers(-(2**31), 2**31 - 1),
)
def test_generated_requests_keep_their_values(
    hostid: int, ncpus: int, work: float, names: list[str], exit_code: int
) -> None:
    results: list[dict[str, object]] = [
        {"name": n, "cpu": 1.5, "exit": exit_code, "stderr": "x"} for n in names
    ]
    req = parse_scheduler_request(
        request(hostid=hostid, ncpus=ncpus, work=work, results=results, others=names)
    )
    assert req.hostid == hostid and req.host.p_ncpus == ncpus
    assert abs(req.work_req_seconds - work) <= 1e-6 * max(1.0, work)
    assert [r.name for r in req.results] == names and req.other_results == tuple(names)
    assert all(r.exit_status == exit_code for r in req.results)
