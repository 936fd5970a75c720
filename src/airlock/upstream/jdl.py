"""DIRAC JDL -> what Airlock runs, or the reason Airlock cannot run it (pure: no DIRAC, no database).

A matched job becomes one Airlock job:
- the command is ``Executable`` + ``Arguments`` when the executable is one the operator allows
  (``dirac_executables``), or a ``.sh``/``.py`` script shipped in the input sandbox (run by /bin/sh or
  python3); ``StdOutput``/``StdError`` are redirected to their files when the job wants them back;
- the outputs are the names of ``OutputSandbox`` and ``OutputData`` (each one plain file name);
- ``OutputData`` names become LFNs as DIRAC's job wrapper makes them: under ``OutputPath`` if that is
  absolute in the VO's namespace, else ``/<vo>/user/<o>/<owner>/<OutputPath or job id>/<name>``; the
  storage element is the JDL's ``OutputSE``, else ``dirac_output_se``.
Anything else that Airlock cannot honour (more processors than allowed, tags the volunteers lack, a CPU
time above the cap, wildcard outputs, a workflow executable) is refused with a reason that DIRAC shows as
the job's minor status.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from airlock.config import Settings
from airlock.core.schemas import FILE_NAME_RE
from airlock.upstream.base import OutputFile, UpstreamJob
from airlock.upstream.dirac_client import MatchedJob

REFUSED_PREFIX = "Airlock: "

# Tags DIRAC's JobScheduling optimizer derives from the processor counts ("4Processors", "MultiProcessor"):
# those counts are checked themselves, so these tags need nothing more of a volunteer.
_DERIVED_TAG = re.compile(r"^(\d+Processors|MultiProcessor)$")


def _as_int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return -1  # unreadable: refused by the caller's range check


class Refused(Exception):
    """The job cannot run on Airlock; str() is the reason."""


def output_lfn(
    name_or_lfn: str, *, vo: str | None, owner: str | None, output_path: str | None, job_id: int
) -> str:
    """The LFN of an OutputData entry, as DIRAC's job wrapper would make it."""
    if name_or_lfn.upper().startswith("LFN:"):
        return name_or_lfn[4:]
    if name_or_lfn.startswith("/"):
        return name_or_lfn
    name = name_or_lfn
    if output_path and vo and output_path.startswith(f"/{vo}/"):
        return f"{output_path.rstrip('/')}/{name}"
    user = owner or "unknown"
    base = f"/{vo or 'unknown'}/user/{user[0]}/{user}"
    sub = output_path.strip("/") if output_path else f"{job_id // 1000}/{job_id}"
    return f"{base}/{sub}/{name}"


def _check_name(name: str, what: str) -> str:
    if any(c in name for c in "*?[]"):
        raise Refused(f"{what} {name!r} is a pattern; Airlock needs each output file named")
    if not FILE_NAME_RE.match(name):
        raise Refused(f"{what} {name!r} is not a plain file name")
    return name


def _command(job: MatchedJob, settings: Settings, sandbox_names: set[str]) -> list[str]:
    exe = (job.executable or "").strip()
    if not exe:
        raise Refused("the JDL has no Executable")
    try:
        args = shlex.split(job.arguments or "")
    except ValueError as exc:
        raise Refused(f"Arguments do not parse ({exc})") from exc
    if exe in settings.dirac_executables:
        return [exe, *args]
    base = exe[2:] if exe.startswith("./") else exe
    if base in sandbox_names and base.endswith(".sh"):
        return ["/bin/sh", base, *args]
    if base in sandbox_names and base.endswith(".py"):
        return ["python3", base, *args]
    raise Refused(f"unknown executable {exe!r} (Airlock runs sh, bash, python3 or a .sh/.py of the sandbox)")


def translate(job: MatchedJob, settings: Settings) -> UpstreamJob:
    """The Airlock view of a matched DIRAC job; ``problem`` says why Airlock cannot run it, if so.

    Everything is read from the worker's parsed fields (DIRAC's own ClassAd parser), not from the raw JDL
    text, which is kept only to be shown."""
    base = UpstreamJob(
        ref=str(job.job_id),
        name=(job.job_name or f"dirac-{job.job_id}")[:200],
        owner=job.owner,
        owner_group=job.owner_group,
        owner_dn=job.owner_dn,
        command=(),
        inputs=(),
        outputs=(),
        output_sandbox=(),
        output_data=(),
        extra={"vo": job.vo, "jdl": job.jdl, "platform": job.platform},
    )
    try:
        return _translate(job, settings, base)
    except Refused as exc:
        return UpstreamJob(**{**base.__dict__, "problem": str(exc)})


def _translate(job: MatchedJob, settings: Settings, base: UpstreamJob) -> UpstreamJob:
    # inputs: sandbox PFNs ("SB:...") the Matcher resolved, LFNs of the sandbox and InputData
    sandbox_lfns = [s for s in job.input_sandbox if s.upper().startswith("LFN:")]
    inputs = [
        *job.input_sandbox_pfns,
        *sandbox_lfns,
        *(f"LFN:{d.removeprefix('LFN:')}" for d in job.input_data),
    ]
    sandbox_names = {s.rsplit("/", 1)[-1] for s in job.input_sandbox if not s.upper().startswith("LFN:")}

    # NumberOfProcessors is exact; else MinNumberOfProcessors is what the job needs at least
    exact = job.number_of_processors
    cores = _as_int(exact if exact is not None else job.min_number_of_processors, 1)
    max_cores = _as_int(job.max_number_of_processors, cores)
    if cores < 1 or cores > settings.dirac_max_cores or max_cores < 1:
        what = (
            "MinNumberOfProcessors"
            if exact is None and job.min_number_of_processors
            else "NumberOfProcessors"
        )
        raise Refused(f"{what} {cores} is not supported (at most {settings.dirac_max_cores})")
    cores = min(max(cores, 1), settings.dirac_max_cores)
    missing = [t for t in job.tags if t not in settings.dirac_tags and not _DERIVED_TAG.match(t)]
    if missing:
        raise Refused(f"unsupported requirement: Tags {', '.join(missing)}")
    cpu = job.cpu_time if job.cpu_time is not None else _as_int(job.fields.get("CPUTime"), 3600)
    if cpu < 0 or cpu > settings.dirac_max_cpu_time:
        raise Refused(f"CPUTime {cpu} is more than Airlock accepts ({settings.dirac_max_cpu_time})")
    job_type = (job.job_type or "User").strip()
    if job_type not in ("User", "Test", "MonteCarlo", "Simulation", "Analysis"):
        raise Refused(f"unsupported JobType {job_type!r}")

    command = _command(job, settings, sandbox_names)

    # outputs
    sandbox = [
        _check_name(n, "OutputSandbox entry") for n in job.output_sandbox if not n.upper().startswith("LFN:")
    ]
    if len(sandbox) != len(job.output_sandbox):
        raise Refused("OutputSandbox entries with LFN: are not supported; use OutputData")
    vo = job.vo
    se_list = list(job.output_se) or ([settings.dirac_output_se] if settings.dirac_output_se else [])
    data: list[OutputFile] = []
    for entry in job.output_data:
        name = _check_name(entry.removeprefix("LFN:").rsplit("/", 1)[-1], "OutputData entry")
        if not se_list:
            raise Refused("OutputData without an OutputSE (and the gateway has no dirac_output_se)")
        lfn = output_lfn(entry, vo=vo, owner=job.owner, output_path=job.output_path, job_id=job.job_id)
        data.append(OutputFile(name=name, lfn=lfn, se=se_list[0]))
    stdout = job.std_output or "std.out"
    stderr = job.std_error or "std.err"
    outputs = list(dict.fromkeys([*sandbox, *(d.name for d in data)]))
    if not outputs:  # Airlock needs something to validate: the job's standard output comes back
        sandbox = [stdout]
        outputs = [stdout]
    redirect = [(">", stdout)] if stdout in outputs else []
    if stderr in outputs:
        redirect.append(("2>", stderr))
    if redirect:
        script = 'exec "$@"' + "".join(f" {op}{shlex.quote(name)}" for op, name in redirect)
        command = ["/bin/sh", "-c", script, "airlock-dirac-job", *command]
    names_in = sandbox_names | {i.rsplit("/", 1)[-1] for i in inputs if i.upper().startswith("LFN:")}
    clash = names_in & set(outputs)
    if clash:
        raise Refused(f"outputs {sorted(clash)} have the names of inputs")
    return UpstreamJob(
        **{
            **base.__dict__,
            "command": tuple(command),
            "inputs": tuple(inputs),
            "outputs": tuple(outputs),
            "output_sandbox": tuple(sandbox),
            "output_data": tuple(data),
            "cores": cores,
            "runtime_s": max(1, min(cpu or 3600, 10**7)),
        }
    )
