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

Ops: ping, match, download_sandbox, get_file, set_status, set_parameters, heartbeat,
upload_output_sandbox, put_and_register, get_replicas, reschedule, job_status.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

PROTOCOL_VERSION = 1
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

    cpu = None
    if ad.lookupAttribute("CPUTime"):
        try:
            cpu = int(float(s("CPUTime")))
        except (TypeError, ValueError):
            cpu = None
    return {
        "Executable": s("Executable"),
        "Arguments": s("Arguments"),
        "InputSandbox": lst("InputSandbox"),
        "InputData": lst("InputData"),
        "OutputSandbox": lst("OutputSandbox"),
        "OutputData": lst("OutputData"),
        "OutputSE": lst("OutputSE"),
        "OutputPath": s("OutputPath"),
        "CPUTime": cpu,
        "JobName": s("JobName"),
        "JobType": s("JobType"),
        "Owner": s("Owner"),
        "OwnerGroup": s("OwnerGroup"),
        "VO": s("VirtualOrganization") or s("VO"),
    }


# ---------------------------------------------------------------- ops


def op_ping(args):
    return {"pong": True, "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "dirac_loaded": _dirac_ready}


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


def op_set_status(args):
    _init_dirac()
    from DIRAC.WorkloadManagementSystem.Client.JobStateUpdateClient import JobStateUpdateClient

    job_id = _job_id(args)
    status = args.get("status") or ""
    minor = args.get("minor") or ""
    application = args.get("application")
    source = args.get("source") or "Airlock"
    if not status and not minor and application is None:
        raise OpError("set_status needs a status, a minor status or an application status")
    _check_job_exists(job_id)
    client = JobStateUpdateClient()
    if status or minor:
        _value(client.setJobStatus(job_id, status, minor, source), "setJobStatus")
    if application is not None:
        _value(client.setJobApplicationStatus(job_id, str(application), source), "setJobApplicationStatus")
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
