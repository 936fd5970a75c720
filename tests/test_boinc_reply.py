"""The scheduler reply carries what the stock client needs (notes/boinc-protocol.md) and escapes every
value; app files arrive with signatures that verify with the project key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from defusedxml.ElementTree import fromstring

from airlock.boinc.apps import AppVersion, sign_app
from airlock.boinc.reply import InputFile, Message, OutputFile, Result, SchedulerReply, Workunit, render_reply
from airlock.boinc.signing import (
    generate_key,
    parse_public_key_text,
    private_pem,
    public_key_text,
    verify_file,
)

OUTPUT = OutputFile(
    "job12_task34_ab_0", "events.root", "http://127.0.0.1:8080/boinc/file_upload_handler", 8_000_000
)


@pytest.fixture
def signed(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, AppVersion]:
    key = tmp_path / "offline" / "key.pem"
    key.parent.mkdir()
    k = generate_key()
    key.write_bytes(private_pem(k))
    main = tmp_path / "airlock_wrapper"
    main.write_bytes(b"#!/bin/sh\nexec true\n")
    data = tmp_path / "gateway"
    version = sign_app(key, data, "airlock", 100, [main], platform="x86_64-pc-linux-gnu")
    return k, version


def test_a_reply_with_work_acks_and_aborts(signed: tuple[rsa.RSAPrivateKey, AppVersion]) -> None:
    key, version = signed
    reply = SchedulerReply(
        project_name="Airlock test",
        master_url="http://127.0.0.1:8080/boinc/",
        hostid=7,
        next_rpc_delay=30,
        code_sign_key=public_key_text(key.public_key()),
        app_versions=[(version, "http://127.0.0.1:8080/boinc/download/apps/airlock/100")],
        workunits=[
            Workunit(
                name="job12",
                app="airlock",
                command_line="--seed 1 --note '<&>'",
                inputs=(
                    InputFile(
                        "in_ab12", "lbmc.py", "http://127.0.0.1:8080/boinc/download/in_ab12", 42, "0" * 32
                    ),
                ),
            )
        ],
        results=[Result("job12_task34_ab", "job12", 1_800_000_000, (OUTPUT,))],
        acks=["job11_task30_cd"],
        aborts=["job9_task20_ef"],
        messages=[Message("<b>welcome</b> & thanks", "high")],
    )
    root = fromstring(render_reply(reply))
    assert root.tag == "scheduler_reply"
    assert root.findtext("master_url") == "http://127.0.0.1:8080/boinc/" and root.findtext("hostid") == "7"
    assert float(root.findtext("next_rpc_delay") or 0) == 30
    assert (
        root.find("message").text == "<b>welcome</b> & thanks"
        and root.find("message").get("priority") == "high"
    )
    public = parse_public_key_text(root.findtext("code_sign_key") or "")
    assert public.public_numbers() == key.public_key().public_numbers()
    # the app: signed executable, main program, platform
    av = root.find("app_version")
    assert av.findtext("app_name") == "airlock" and av.findtext("version_num") == "100"
    assert av.findtext("platform") == "x86_64-pc-linux-gnu"
    assert (
        av.find("file_ref/main_program") is not None
        and av.findtext("file_ref/file_name") == "airlock_wrapper"
    )
    infos = {fi.findtext("name"): fi for fi in root.findall("file_info")}
    app_file = infos["airlock_wrapper"]
    assert app_file.find("executable") is not None
    assert verify_file(public, version.folder / "airlock_wrapper", app_file.findtext("file_signature") or "")
    # the input: verified by the client (size and MD5), copied into the slot under its open name
    assert (
        infos["in_ab12"].findtext("md5_cksum") == "0" * 32
        and float(infos["in_ab12"].findtext("nbytes") or 0) == 42
    )
    wu = root.find("workunit")
    assert wu.findtext("command_line") == "--seed 1 --note '<&>'"
    assert wu.findtext("file_ref/open_name") == "lbmc.py" and wu.find("file_ref/copy_file") is not None
    # the output: upload URL and a positive max_nbytes; the result with its deadline
    out = infos["job12_task34_ab_0"]
    assert "file_upload_handler" in (out.findtext("url") or "")
    assert float(out.findtext("max_nbytes") or 0) == 8_000_000 and out.find("upload_when_present") is not None
    res = root.find("result")
    assert res.findtext("wu_name") == "job12" and res.findtext("report_deadline") == "1800000000"
    assert res.findtext("file_ref/open_name") == "events.root"
    assert [e.findtext("name") for e in root.findall("result_ack")] == ["job11_task30_cd"]
    assert [e.findtext("name") for e in root.findall("result_abort")] == ["job9_task20_ef"]


def test_the_key_goes_only_on_first_contact_and_outputs_need_a_size_limit() -> None:
    plain = fromstring(render_reply(SchedulerReply(project_name="p", master_url="http://127.0.0.1/")))
    assert plain.find("code_sign_key") is None and plain.find("result") is None
    unbounded = OutputFile("r_0", "out", "http://u/file_upload_handler", 0)
    bad = SchedulerReply(
        project_name="p", master_url="http://127.0.0.1/", results=[Result("r", "w", 1, (unbounded,))]
    )
    with pytest.raises(ValueError, match="max_nbytes"):
        render_reply(bad)
