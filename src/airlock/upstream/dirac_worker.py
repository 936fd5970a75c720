# mypy: ignore-errors
"""DIRAC worker: performs the gateway's DIRAC 9.1 operations for Airlock.

A standalone program (stdlib + DIRAC only, no ``airlock`` imports): it runs under the DIRAC venv's
python. It reads JSON lines ``{"id": n, "op": "...", "args": {...}}`` on stdin and writes one JSON line
per request on stdout: ``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false, "error":
"..."}``. Everything else (DIRAC's logging, tracebacks) goes to stderr.

Identity: the gateway's own -- a host certificate registered in the DIRAC Registry (GenericPilot,
TrustedHost, JobAdministrator) given by AIRLOCK_DIRAC_GATEWAY_CERT/AIRLOCK_DIRAC_GATEWAY_KEY, or a proxy
of it given by AIRLOCK_DIRAC_GATEWAY_PROXY. An op that is given ``owner_proxy`` runs that one call with
the owner's proxy (DIRAC requires the output sandbox to be uploaded as the job's owner).

DIRAC is imported on the first op that needs it, so ``ping`` answers at once.

Ops: ping, match, parse_jdl, input_sizes, download_sandbox, get_file, set_status, set_parameters, heartbeat,
upload_output_sandbox, output_sandboxes, put_and_register, get_replicas, reschedule, job_status.

``set_status`` cuts what DIRAC's columns cannot hold (JobDB/JobLoggingDB: MinorStatus VARCHAR(128),
ApplicationStatus VARCHAR(255), StatusSource VARCHAR(32)): a longer text becomes its first N-3
characters followed by "...", so no caller can make MySQL refuse the update (error 1406).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

PROTOCOL_VERSION = 2
# DIRAC's column widths (JobDB.Jobs, JobLoggingDB.LoggingInfo)
MINOR_STATUS_MAX = 128
APPLICATION_STATUS_MAX = 255
STATUS_SOURCE_MAX = 32
_proto = None  # the protocol channel (the original stdout)
_dirac_ready = False


class OpError(Exception):
    """A clear, expected failure of an op (reported as ok: false)."""


def _log(msg: str) -> None:
    print(f"[dirac-worker] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- DIRAC set-up


def _init_dirac() -> None:
    global _dirac_ready
    if _dirac_ready:
        return
    t0 = time.monotonic()
    gw_proxy = os.environ.get("AIRLOCK_DIRAC_GATEWAY_PROXY")
    cert = os.environ.get("AIRLOCK_DIRAC_GATEWAY_CERT")
    key = os.environ.get("AIRLOCK_DIRAC_GATEWAY_KEY")
    if not gw_proxy:
        if cert and key:
            os.environ["DIRAC_X509_HOST_CERT"] = cert
            os.environ["DIRAC_X509_HOST_KEY"] = key
        os.environ.pop("X509_USER_PROXY", None)
    else:
        os.environ["X509_USER_PROXY"] = gw_proxy
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]]
    try:
        from DIRAC.Core.Base.Script import Script

        Script.parseCommandLine(ignoreErrors=True)
    finally:
        sys.argv = saved_argv
    from DIRAC.ConfigurationSystem.Client.ConfigurationData import gConfigurationData

    gConfigurationData.setOptionInCFG("/DIRAC/Security/UseServerCertificate", "false" if gw_proxy else "true")
    _dirac_ready = True
    _log(f"DIRAC initialised in {time.monotonic() - t0:.1f}s")


@contextlib.contextmanager
def _as_owner(proxy: str | None):
    """Run the block with the owner's proxy instead of the gateway identity (requests are serial)."""
    if not proxy:
        yield
        return
    if not os.path.isfile(proxy):
        raise OpError(f"owner proxy file not found: {proxy}")
    from DIRAC import gConfig
    from DIRAC.ConfigurationSystem.Client.ConfigurationData import gConfigurationData

    old_proxy = os.environ.get("X509_USER_PROXY")
    old_server = gConfig.useServerCertificate()
    os.environ["X509_USER_PROXY"] = proxy
    gConfigurationData.setOptionInCFG("/DIRAC/Security/UseServerCertificate", "false")
    try:
        yield
    finally:
        if old_proxy is None:
            os.environ.pop("X509_USER_PROXY", None)
        else:
            os.environ["X509_USER_PROXY"] = old_proxy
        gConfigurationData.setOptionInCFG(
            "/DIRAC/Security/UseServerCertificate", "true" if old_server else "false"
        )


def _value(result, what: str):
    """S_OK/S_ERROR -> value or OpError."""
    if not isinstance(result, dict) or "OK" not in result:
        raise OpError(f"{what}: unexpected reply {result!r}")
    if not result["OK"]:
        raise OpError(f"{what}: {result.get('Message', 'unknown error')}")
    return result.get("Value")


def _single(value, key: str, what: str):
    """A DIRAC bulk reply {'Successful': {...}, 'Failed': {...}} for one key."""
    if key in value.get("Failed", {}):
        raise OpError(f"{what}: {value['Failed'][key]}")
    if key not in value.get("Successful", {}):
        raise OpError(f"{what}: no result for {key}")
    return value["Successful"][key]


def _job_id(args) -> int:
    try:
        job_id = int(args["job_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OpError(f"job_id must be an integer: {args.get('job_id')!r}") from exc
    if job_id <= 0:
        raise OpError(f"job_id must be positive: {job_id}")
    return job_id


def _str_arg(args, name: str, optional: bool = False):
    value = args.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise OpError(f"{name} must be a non-empty string")
    return value


def _check_job_exists(job_id: int) -> None:
    from DIRAC.WorkloadManagementSystem.Client.JobMonitoringClient import JobMonitoringClient

    states = _value(JobMonitoringClient().getJobsStatus([job_id]), "getJobsStatus")
    if not states or job_id not in {int(k) for k in states}:
        raise OpError(f"job {job_id} not found")


# ---------------------------------------------------------------- JDL


def _jdl_fields(jdl: str) -> dict:
    from DIRAC.Core.Utilities.ClassAd.ClassAdLight import ClassAd

    ad = ClassAd(jdl if jdl.strip().startswith("[") else f"[{jdl}]")
    if not ad.isOK():
        raise OpError("the matched job's JDL does not parse")

    def s(name):
        return ad.getAttributeString(name) if ad.lookupAttribute(name) else None

    def lst(name):
        if not ad.lookupAttribute(name):
            return []
        return [x for x in ad.getListFromExpression(name) if x]

    def num(name):
        """An integer attribute; its raw text when it is not one (the gateway refuses it), None if absent."""
        if not ad.lookupAttribute(name):
            return None
        raw = s(name).strip()
        try:
            return int(float(raw))
        except (TypeError, ValueError):
            return raw

    return {
        "Executable": s("Executable"),
        "Arguments": s("Arguments"),
        "InputSandbox": lst("InputSandbox"),
        "InputData": lst("InputData"),
        "OutputSandbox": lst("OutputSandbox"),
        "OutputData": lst("OutputData"),
        "OutputSE": lst("OutputSE"),
        "OutputPath": s("OutputPath"),
        "CPUTime": num("CPUTime"),
        "JobName": s("JobName"),
        "JobType": s("JobType"),
        "Owner": s("Owner"),
        "OwnerGroup": s("OwnerGroup"),
        "VO": s("VirtualOrganization") or s("VO"),
        "NumberOfProcessors": num("NumberOfProcessors"),
        "MinNumberOfProcessors": num("MinNumberOfProcessors"),
        "MaxNumberOfProcessors": num("MaxNumberOfProcessors"),
        "Tags": lst("Tags"),
        "Tag": lst("Tag"),
        "StdOutput": s("StdOutput"),
        "StdError": s("StdError"),
        "Platform": s("Platform"),
    }


# ---------------------------------------------------------------- ops


def op_ping(args):
    return {"pong": True, "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "dirac_loaded": _dirac_ready}


def op_parse_jdl(args):
    """The fields ``match`` gives for a JDL (DIRAC's ClassAd parser), for a JDL at hand."""
    _init_dirac()
    return _jdl_fields(_str_arg(args, "jdl"))


def op_match(args):
    _init_dirac()
    from DIRAC.Core.Utilities import DErrno
    from DIRAC.WorkloadManagementSystem.Client.MatcherClient import MatcherClient

    resource = dict(args.get("resource") or {})
    resource.setdefault("Site", os.environ.get("AIRLOCK_DIRAC_SITE", "BOINC.Airlock.org"))
    resource.setdefault("GridCE", os.environ.get("AIRLOCK_DIRAC_CE", "boinc.airlock.org"))
    resource.setdefault("Queue", os.environ.get("AIRLOCK_DIRAC_QUEUE", "boinc"))
    # a host identity matches jobs of the groups of this VO only (mandatory for hosts)
    resource.setdefault("VirtualOrganization", os.environ.get("AIRLOCK_DIRAC_VO", "airlock"))
    resource.setdefault("CPUTime", 86400)
    resource.setdefault("ReleaseVersion", "v9.1.22")
    resource.setdefault("PilotReference", f"airlock-gateway-{os.getpid()}")
    result = MatcherClient().requestJob(resource)
    if not result["OK"]:
        errno = result.get("Errno")
        msg = result.get("Message", "")
        if errno == DErrno.EWMSNOMATCH or "No match found" in msg:
            return None
        raise OpError(f"requestJob: {msg}")
    value = result["Value"]
    jdl = value.get("JDL", "")
    fields = _jdl_fields(jdl)
    owner = value.get("Owner") or fields.get("Owner")
    group = value.get("Group") or value.get("OwnerGroup") or fields.get("OwnerGroup")
    vo = fields.get("VO")
    if not vo and group:
        from DIRAC.ConfigurationSystem.Client.Helpers.Registry import getVOForGroup

        vo = getVOForGroup(group) or None
    fields.update({"Owner": owner, "OwnerGroup": group, "VO": vo})
    owner_dn = value.get("DN") or value.get("OwnerDN")
    if not owner_dn and owner:
        from DIRAC.ConfigurationSystem.Client.Helpers.Registry import getDNForUsername

        dns = getDNForUsername(owner)
        owner_dn = dns["Value"][0] if dns["OK"] and dns["Value"] else None
    return {
        "job_id": int(value["JobID"]),
        "jdl": jdl,
        "owner": owner,
        "owner_group": group,
        "owner_dn": owner_dn,
        "vo": vo,
        "fields": fields,
        "input_sandbox_pfns": [x for x in fields["InputSandbox"] if x.startswith("SB:")],
    }


def _split_sb(pfn: str):
    """A sandbox PFN, SB:<SE>|<path> -> (SE, path)."""
    se, sep, path = pfn[3:].partition("|") if pfn.startswith("SB:") else ("", "", "")
    if not se or not sep or not path:
        raise OpError(f"not a sandbox PFN (SB:<SE>|<path>): {pfn}")
    return se, path


_sandbox_db = None  # SandboxMetadataDB, when this DIRAC configuration gives access to it (False: it does not)


def _sandbox_size_from_db(se: str, path: str):
    """The sandbox's size as the SandboxStore recorded it (sb_SandBoxes.Bytes: the packed archive), when
    the configuration names SandboxMetadataDB; None if it cannot tell."""
    global _sandbox_db
    if _sandbox_db is None:
        from DIRAC.ConfigurationSystem.Client.Utilities import getDBParameters

        _sandbox_db = False
        if getDBParameters("WorkloadManagement/SandboxMetadataDB")["OK"]:
            try:
                from DIRAC.WorkloadManagementSystem.DB.SandboxMetadataDB import SandboxMetadataDB

                _sandbox_db = SandboxMetadataDB()
            except Exception as exc:  # no access (network, grants): the SE is asked instead
                _log(f"SandboxMetadataDB not usable: {exc}")
    if not _sandbox_db:
        return None
    rows = _value(
        _sandbox_db._query(
            "SELECT Bytes FROM `sb_SandBoxes` WHERE SEName = %s AND SEPFN = %s", args=(se, path)
        ),
        "SandboxMetadataDB",
    )
    if not rows or rows[0][0] is None or int(rows[0][0]) <= 0:  # Bytes defaults to 0: not recorded
        return None
    return int(rows[0][0])


def op_input_sizes(args):
    """Sizes in bytes of input sandboxes ("SB:...": the packed archive, from SandboxMetadataDB or the
    sandbox SE) and of LFNs (the file catalog's Size), without downloading them. A size DIRAC cannot give
    is null, with the reason in ``errors``."""
    _init_dirac()
    pfns = args.get("pfns") or []
    lfns = args.get("lfns") or []
    if not isinstance(pfns, list) or not all(isinstance(x, str) for x in pfns):
        raise OpError("pfns must be a list of sandbox PFNs")
    if not isinstance(lfns, list) or not all(isinstance(x, str) and x.startswith("/") for x in lfns):
        raise OpError("lfns must be a list of LFNs (absolute paths)")
    sizes = {}
    how = {}
    errors = {}
    for pfn in pfns:
        se, path = _split_sb(pfn)
        sizes[pfn] = None
        try:
            size = _sandbox_size_from_db(se, path)
            if size is not None:
                sizes[pfn], how[pfn] = size, "SandboxMetadataDB"
                continue
        except OpError as exc:
            errors[pfn] = str(exc)
        from DIRAC.Core.Utilities.ReturnValues import returnSingleResult
        from DIRAC.Resources.Storage.StorageElement import StorageElement

        try:
            result = returnSingleResult(StorageElement(se).getFileSize(path))
        except Exception as exc:  # a plugin raising
            result = {"OK": False, "Message": f"{type(exc).__name__}: {exc}"}
        if result["OK"] and isinstance(result["Value"], int):
            sizes[pfn], how[pfn] = int(result["Value"]), "StorageElement"
            errors.pop(pfn, None)
        else:
            errors[pfn] = f"{se}: {result.get('Message') or result.get('Value')}"
    if lfns:
        from DIRAC.Resources.Catalog.FileCatalog import FileCatalog

        value = _value(FileCatalog().getFileMetadata(lfns), "getFileMetadata")
        for lfn in lfns:
            meta = value.get("Successful", {}).get(lfn)
            size = meta.get("Size") if isinstance(meta, dict) else None
            sizes[lfn] = None if size is None else int(size)
            if size is None:
                errors[lfn] = str(value.get("Failed", {}).get(lfn) or "no size in the catalog")
            else:
                how[lfn] = "FileCatalog"
    return {"sizes": sizes, "how": how, "errors": errors}


def op_download_sandbox(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.SandboxStoreClient import SandboxStoreClient

    pfn = _str_arg(args, "pfn")
    dest = _str_arg(args, "dest_dir")
    if not pfn.startswith("SB:"):
        raise OpError(f"not a sandbox PFN (SB:...): {pfn}")
    os.makedirs(dest, exist_ok=True)
    before = set(os.listdir(dest))
    _value(SandboxStoreClient().downloadSandbox(pfn, destinationDir=dest, unpack=True), "downloadSandbox")
    files = sorted(set(os.listdir(dest)) - before) or sorted(os.listdir(dest))
    return {"dest_dir": dest, "files": files}


def op_get_file(args):
    _init_dirac()
    from DIRAC.DataManagementSystem.Client.DataManager import DataManager

    lfn = _str_arg(args, "lfn")
    dest = _str_arg(args, "dest_dir")
    os.makedirs(dest, exist_ok=True)
    with _as_owner(args.get("owner_proxy")):
        value = _value(DataManager().getFile(lfn, destinationDir=dest), "getFile")
    path = _single(value, lfn, "getFile")
    if not isinstance(path, str):
        path = os.path.join(dest, os.path.basename(lfn))
    return {"path": path}


def _cut(text: str, limit: int) -> str:
    """The rule for DIRAC's status columns: text longer than ``limit`` becomes its first limit-3
    characters and "..."."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def op_set_status(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobStateUpdateClient import JobStateUpdateClient

    job_id = _job_id(args)
    status = str(args.get("status") or "")
    minor = _cut(str(args.get("minor") or ""), MINOR_STATUS_MAX)
    application = args.get("application")
    if application is not None:
        application = _cut(str(application), APPLICATION_STATUS_MAX)
    source = _cut(str(args.get("source") or "Airlock"), STATUS_SOURCE_MAX)
    if not status and not minor and application is None:
        raise OpError("set_status needs a status, a minor status or an application status")
    _check_job_exists(job_id)
    client = JobStateUpdateClient()
    if status or minor:
        _value(client.setJobStatus(job_id, status, minor, source), "setJobStatus")
    if application is not None:
        _value(client.setJobApplicationStatus(job_id, application, source), "setJobApplicationStatus")
    from DIRAC.WorkloadManagementSystem.Client.JobMonitoringClient import JobMonitoringClient

    states = _value(JobMonitoringClient().getJobsStates([job_id]), "getJobsStates") or {}
    state = states.get(job_id) or states.get(str(job_id)) or {}
    if status and state.get("Status") != status:
        raise OpError(
            f"job {job_id}: DIRAC refused the transition to {status} (status is {state.get('Status')})"
        )
    return {
        "Status": state.get("Status"),
        "MinorStatus": state.get("MinorStatus"),
        "ApplicationStatus": state.get("ApplicationStatus"),
    }


def op_set_parameters(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobStateUpdateClient import JobStateUpdateClient

    job_id = _job_id(args)
    params = args.get("params")
    if not isinstance(params, dict) or not params:
        raise OpError("params must be a non-empty object")
    _check_job_exists(job_id)
    pairs = [[str(k), str(v)] for k, v in params.items()]
    _value(JobStateUpdateClient().setJobParameters(job_id, pairs), "setJobParameters")
    return {"set": sorted(params)}


def op_heartbeat(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobStateUpdateClient import JobStateUpdateClient

    job_id = _job_id(args)
    metrics = args.get("metrics") or {}
    static = args.get("static") or {}
    if not isinstance(metrics, dict) or not isinstance(static, dict):
        raise OpError("metrics and static must be objects")
    value = _value(JobStateUpdateClient().sendHeartBeat(job_id, metrics, static), "sendHeartBeat")
    return {str(k): ("" if v is None else str(v)) for k, v in (value or {}).items()}


def op_upload_output_sandbox(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.SandboxStoreClient import SandboxStoreClient

    job_id = _job_id(args)
    files = args.get("files")
    owner_proxy = _str_arg(args, "owner_proxy")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise OpError("files must be a non-empty list of paths")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise OpError(f"files not found: {missing}")
    with _as_owner(owner_proxy):
        result = SandboxStoreClient().uploadFilesAsSandbox(files, assignTo={f"Job:{job_id}": "Output"})
    tmp = result.get("SandboxFileName") if isinstance(result, dict) else None
    if tmp and os.path.exists(tmp):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return {"pfn": _value(result, "uploadFilesAsSandbox")}


def op_output_sandboxes(args):
    """The sandboxes assigned to the job as Output (PFNs), as the SandboxStore lists them for the caller
    (give ``owner_proxy``: the owner sees the sandboxes uploaded in their name)."""
    _init_dirac()
    from DIRAC.Core.Base.Client import Client

    job_id = _job_id(args)
    with _as_owner(args.get("owner_proxy")):
        value = _value(
            Client(url="WorkloadManagement/SandboxStore").getSandboxesAssignedToEntity(f"Job:{job_id}"),
            "getSandboxesAssignedToEntity",
        )
    return {"pfns": sorted({str(p) for p in (value or {}).get("Output", [])})}


def op_put_and_register(args):
    _init_dirac()
    from DIRAC.DataManagementSystem.Client.DataManager import DataManager

    lfn = _str_arg(args, "lfn")
    path = _str_arg(args, "path")
    se = _str_arg(args, "se")
    if not lfn.startswith("/"):
        raise OpError(f"an LFN is an absolute path: {lfn}")
    if not os.path.isfile(path):
        raise OpError(f"file not found: {path}")
    with _as_owner(args.get("owner_proxy")):
        value = _value(DataManager().putAndRegister(lfn, path, se), "putAndRegister")
    done = _single(value, lfn, "putAndRegister")
    if isinstance(done, dict) and "register" not in done:
        raise OpError(f"putAndRegister: {lfn} was put on {se} but not registered: {done}")
    return {"lfn": lfn, "se": se}


def op_get_replicas(args):
    _init_dirac()
    from DIRAC.DataManagementSystem.Client.DataManager import DataManager

    lfn = _str_arg(args, "lfn")
    value = _value(DataManager().getReplicas(lfn), "getReplicas")
    replicas = _single(value, lfn, "getReplicas")
    return {str(se): str(pfn) for se, pfn in (replicas or {}).items()}


def op_reschedule(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobManagerClient import JobManagerClient

    job_id = _job_id(args)
    _check_job_exists(job_id)
    result = JobManagerClient().rescheduleJob([job_id])
    if not result["OK"]:
        failed = (
            result.get("FailedJobIDs") or result.get("InvalidJobIDs") or result.get("NonauthorizedJobIDs")
        )
        raise OpError(f"rescheduleJob: {result.get('Message')}" + (f" ({failed})" if failed else ""))
    return {"rescheduled": [int(j) for j in (result.get("Value") or [job_id])]}


def op_job_status(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobMonitoringClient import JobMonitoringClient

    job_id = _job_id(args)
    states = _value(JobMonitoringClient().getJobsStates([job_id]), "getJobsStates") or {}
    state = states.get(job_id) or states.get(str(job_id))
    if not state:
        raise OpError(f"job {job_id} not found")
    return {k: state.get(k) for k in ("Status", "MinorStatus", "ApplicationStatus")}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)}


# ---------------------------------------------------------------- loop


def _reply(msg: dict) -> None:
    _proto.write(json.dumps(msg, default=str) + "\n")
    _proto.flush()


def _handle(line: str) -> None:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as exc:
        _reply({"id": None, "ok": False, "error": f"request is not JSON: {exc}"})
        return
    if not isinstance(req, dict):
        _reply({"id": None, "ok": False, "error": "request is not an object"})
        return
    rid = req.get("id")
    op = req.get("op")
    args = req.get("args") or {}
    fn = OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        _reply({"id": rid, "ok": False, "error": f"unknown op: {op!r}"})
        return
    if not isinstance(args, dict):
        _reply({"id": rid, "ok": False, "error": "args must be an object"})
        return
    t0 = time.monotonic()
    try:
        result = fn(args)
    except OpError as exc:
        _log(f"{op} #{rid} failed: {exc}")
        _reply({"id": rid, "ok": False, "error": str(exc)})
        return
    except Exception as exc:  # DIRAC raising: report it clearly, the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        _reply({"id": rid, "ok": False, "error": f"{op}: {type(exc).__name__}: {exc}"})
        return
    _log(f"{op} #{rid} ok in {time.monotonic() - t0:.2f}s")
    _reply({"id": rid, "ok": True, "result": result})


def main() -> None:
    global _proto
    # keep the protocol channel private: DIRAC's logger (and anything else) writing to fd 1 lands on stderr
    _proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if line.strip():
            _handle(line)


if __name__ == "__main__":
    main()
