"""The DIRAC upstream: the gateway as a pilot of a "BOINC site", over helper process ``DiracClient``.

The gateway's own DIRAC identity (host certificate, GenericPilot) asks the Matcher for jobs, downloads
their sandboxes and input data, reports their status and heartbeats. Only the output sandbox upload and
the output data registration use the job OWNER's proxy, found for that one call in a folder of
``<owner>.proxy`` files or printed by a configured command, written to a private (0600) file and deleted
right after. Neither the gateway's nor the owner's credential is ever stored in the database or put in
anything a volunteer receives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from airlock.config import Settings
from airlock.upstream.base import OutputFile, UpstreamError, UpstreamJob, UpstreamStatus
from airlock.upstream.dirac_client import (
    APPLICATION_STATUS_MAX,
    MINOR_STATUS_MAX,
    DiracClient,
    DiracError,
    fit_status,
)
from airlock.upstream.jdl import translate

log = logging.getLogger("airlock.upstream.dirac")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (``export`` and quotes allowed, # comments), as in DIRAC's bashrc or env.sh."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            continue
        parts = shlex.split(value) if value else [""]
        env[key] = parts[0] if parts else ""
    return env


def client_from_settings(settings: Settings) -> DiracClient:
    """The DiracClient of the configured DIRAC: ``dirac_dir`` (its dirac.json), or ``dirac_python`` with
    the variables of ``dirac_env_file``."""
    log_file = settings.data_dir / "logs" / "dirac-worker.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if settings.dirac_python is not None:
        env = read_env_file(settings.dirac_env_file) if settings.dirac_env_file else {}
        return DiracClient(settings.dirac_python, env, timeout=settings.dirac_timeout_s, stderr=str(log_file))
    if settings.dirac_dir is None:
        raise UpstreamError("upstream = 'dirac' needs dirac_dir or dirac_python")
    path = settings.dirac_dir / "dirac.json"
    try:
        info = json.loads(path.read_text())
        env = dict(info["env"])
        python = str(info["python"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UpstreamError(f"cannot read the DIRAC description {path}: {exc}") from exc
    if settings.dirac_env_file is not None:
        env.update(read_env_file(settings.dirac_env_file))
    return DiracClient(python, env, timeout=settings.dirac_timeout_s, stderr=str(log_file))


class OwnerProxies:
    """Where the owners' proxies come from: ``<dir>/<owner>.proxy``, or a command printing one (PEM)."""

    def __init__(self, settings: Settings) -> None:
        self.folder = settings.dirac_owner_proxy_dir
        self.command = settings.dirac_owner_proxy_command
        self.scratch = settings.data_dir / "upstream" / "proxies"

    @contextlib.contextmanager
    def proxy_file(self, job: UpstreamJob) -> Iterator[Path]:
        owner = job.owner or ""
        if not owner or "/" in owner or owner.startswith("."):
            raise UpstreamError(f"job {job.ref} has no usable owner name ({owner!r})")
        if self.folder is not None:
            path = self.folder / f"{owner}.proxy"
            if path.is_file():
                yield path
                return
            if self.command is None:
                raise UpstreamError(f"no proxy of owner {owner} ({path} does not exist)")
        if self.command is None:
            raise UpstreamError(
                "no owner proxy source: set dirac_owner_proxy_dir or dirac_owner_proxy_command"
            )
        cmd = self.command.format(
            owner=shlex.quote(owner),
            group=shlex.quote(job.owner_group or ""),
            dn=shlex.quote(job.owner_dn or ""),
        )
        res = subprocess.run(cmd, shell=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        if res.returncode != 0 or b"BEGIN CERTIFICATE" not in res.stdout:
            raise UpstreamError(f"the owner proxy command gave no proxy of {owner} (exit {res.returncode})")
        self.scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix="owner-", suffix=".proxy", dir=self.scratch)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp: mode 0600
                fh.write(res.stdout)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


MINOR_MAX = MINOR_STATUS_MAX  # JobDB.Jobs.MinorStatus is VARCHAR(128)
APPLICATION_MAX = APPLICATION_STATUS_MAX  # JobDB.Jobs.ApplicationStatus is VARCHAR(255)
_fit = fit_status


def _job_id(job: UpstreamJob) -> int:
    return int(job.ref)


class DiracUpstream:
    """:class:`airlock.upstream.base.Upstream` over DIRAC 9.1 (through ``DiracClient``)."""

    name = "dirac"

    def __init__(self, settings: Settings, client: DiracClient | None = None) -> None:
        self.settings = settings
        self.client = client if client is not None else client_from_settings(settings)
        self.proxies = OwnerProxies(settings)

    def resource(self) -> dict[str, Any]:
        s = self.settings
        return {"Site": s.dirac_site, "GridCE": s.dirac_ce, "Queue": s.dirac_queue, **s.dirac_resource}

    @contextlib.contextmanager
    def _dirac(self, what: str) -> Iterator[None]:
        try:
            yield
        except DiracError as exc:
            raise UpstreamError(f"{what}: {exc}") from exc

    def fetch_job(self) -> UpstreamJob | None:
        with self._dirac("match"):
            matched = self.client.match(self.resource())
        return None if matched is None else translate(matched, self.settings)

    def download_inputs(self, job: UpstreamJob, dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        with self._dirac(f"inputs of job {job.ref}"):
            for ref in job.inputs:
                if ref.startswith("SB:"):
                    self.client.download_sandbox(ref, dest)
                elif ref.upper().startswith("LFN:"):
                    self.client.get_file(ref[4:], dest)
                else:
                    raise UpstreamError(f"job {job.ref}: cannot fetch input {ref!r}")
        return sorted(dest.rglob("*"))

    def input_sizes(self, job: UpstreamJob) -> dict[str, int | None]:
        """Each input's size before download (:class:`airlock.upstream.base.InputSizing`): a sandbox's
        packed archive as the SandboxStore recorded it, an LFN's size in the file catalog."""
        pfns = [ref for ref in job.inputs if ref.startswith("SB:")]
        lfns = {ref: ref[4:] for ref in job.inputs if ref.upper().startswith("LFN:")}
        if not pfns and not lfns:
            return {}
        with self._dirac(f"input sizes of job {job.ref}"):
            found = self.client.input_sizes(pfns, sorted(set(lfns.values())))
        if found.errors:
            log.info("job %s: DIRAC does not tell the size of %s", job.ref, dict(found.errors))
        out: dict[str, int | None] = {}
        for ref in job.inputs:
            out[ref] = found.sizes.get(lfns.get(ref, ref))
        return out

    def report_status(self, job: UpstreamJob, status: UpstreamStatus) -> None:
        # the client cuts the minor (128) and application (255) statuses to DIRAC's columns
        with self._dirac(f"status of job {job.ref}"):
            self.client.set_status(_job_id(job), status.status, status.minor, application=status.application)

    def set_parameters(self, job: UpstreamJob, params: Mapping[str, str | int | float]) -> None:
        with self._dirac(f"parameters of job {job.ref}"):
            self.client.set_parameters(_job_id(job), dict(params))

    def heartbeat(self, job: UpstreamJob, metrics: Mapping[str, str | int | float]) -> Mapping[str, str]:
        with self._dirac(f"heartbeat of job {job.ref}"):
            return self.client.heartbeat(_job_id(job), dict(metrics))

    def upload_output_sandbox(self, job: UpstreamJob, files: Sequence[Path]) -> str | None:
        with self.proxies.proxy_file(job) as proxy, self._dirac(f"output sandbox of job {job.ref}"):
            return self.client.upload_output_sandbox(_job_id(job), list(files), owner_proxy=proxy)

    def output_sandboxes(self, job: UpstreamJob) -> list[str]:
        """The job's Output sandboxes in DIRAC (:class:`airlock.upstream.base.OutputSandboxListing`), as
        its owner sees them (the gateway uploads them in the owner's name)."""
        with self.proxies.proxy_file(job) as proxy, self._dirac(f"output sandboxes of job {job.ref}"):
            return self.client.output_sandboxes(_job_id(job), owner_proxy=proxy)

    def output_registered(self, job: UpstreamJob, output: OutputFile) -> bool:
        try:
            return output.se in self.client.get_replicas(output.lfn)
        except DiracError:
            return False  # no such file (or DIRAC is unreachable, and the registration will say so)

    def register_output(self, job: UpstreamJob, output: OutputFile, path: Path) -> None:
        with self.proxies.proxy_file(job) as proxy, self._dirac(f"output {output.lfn} of job {job.ref}"):
            self.client.put_and_register(output.lfn, path, output.se, owner_proxy=proxy)

    def reschedule(self, job: UpstreamJob) -> None:
        with self._dirac(f"reschedule of job {job.ref}"):
            self.client.reschedule(_job_id(job))

    def job_state(self, ref: str) -> tuple[str | None, str | None]:
        """DIRAC's (status, minor status) of a job (for `airlock status`)."""
        with self._dirac(f"status of job {ref}"):
            st = self.client.job_status(int(ref))
        return st.status, st.minor_status

    def close(self) -> None:
        self.client.close()
