"""The upstream interface: what the gateway needs from a workload management system it takes jobs from.

An upstream hands out jobs (``fetch_job``), gives their inputs (``download_inputs``), hears their state
(``report_status``, ``heartbeat``, which answers with commands such as Kill), takes their validated
outputs (``upload_output_sandbox`` as the job's owner, ``register_outputs``) and takes back a job Airlock
could not finish (``reschedule``). Airlock's own submission API is the trivial upstream
(:mod:`airlock.upstream.local`); DIRAC is the other (:mod:`airlock.upstream.dirac`). The gateway side
that drives any upstream (match, cache inputs, create the job, report, hand outputs back) is
:mod:`airlock.upstream.sync`.

Two optional abilities make the gateway safer where an upstream has them (checked with ``isinstance``):
:class:`InputSizing` (the inputs' sizes before any download, so a job too large for volunteers' links is
refused without fetching it) and :class:`OutputSandboxListing` (the output sandboxes the upstream already
holds for a job, so the upload redone after a crash does not store a second one).

Nothing here carries a credential: an upstream finds the owner's credential itself, for the one call
that needs it, and nothing of it is stored in the database or sent to a volunteer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# Statuses the gateway reports (DIRAC's major statuses; other upstreams map them).
RUNNING = "Running"
COMPLETING = "Completing"
DONE = "Done"
FAILED = "Failed"
KILL = "Kill"  # the heartbeat command that aborts a job


@dataclass(frozen=True)
class UpstreamStatus:
    """A job's status as the gateway reports it: major status, minor status, application status."""

    status: str
    minor: str = ""
    application: str | None = None

    def key(self) -> str:
        """One string, stored to remember what the upstream already took."""
        return f"{self.status}|{self.minor}|{self.application or ''}"[:512]


@dataclass(frozen=True)
class OutputFile:
    """An output file the upstream wants registered (an LFN on a storage element)."""

    name: str
    lfn: str
    se: str


@dataclass(frozen=True)
class UpstreamJob:
    """A job an upstream handed to the gateway, already translated to what Airlock runs.

    ``problem`` is set when Airlock cannot run it (unknown executable, unsupported requirement, ...):
    the gateway then refuses it back to the upstream with that reason, and creates nothing.
    """

    ref: str  # the upstream's job id
    name: str
    owner: str | None
    owner_group: str | None
    owner_dn: str | None
    command: tuple[str, ...]
    inputs: tuple[str, ...]  # upstream references of the inputs (sandboxes, LFNs)
    outputs: tuple[str, ...]  # every output file Airlock must collect (names)
    output_sandbox: tuple[str, ...]  # the outputs handed back as the output sandbox
    output_data: tuple[OutputFile, ...]  # the outputs registered as files
    cores: int = 1
    runtime_s: int = 3600
    problem: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # upstream-specific, JSON-safe

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> UpstreamJob:
        d = dict(doc)
        for key in ("command", "inputs", "outputs", "output_sandbox"):
            d[key] = tuple(d.get(key) or ())
        d["output_data"] = tuple(OutputFile(**o) for o in d.get("output_data") or ())
        d["extra"] = dict(d.get("extra") or {})
        return cls(**d)


class UpstreamError(Exception):
    """The upstream refused or failed an operation (the gateway retries it on a later pass)."""


@runtime_checkable
class Upstream(Protocol):
    """A workload management system the gateway takes jobs from and gives their outcome back to."""

    name: str  # the value of batches.upstream

    def fetch_job(self) -> UpstreamJob | None:
        """A job matched for this gateway, or None. Once returned, the job is the gateway's."""
        ...

    def download_inputs(self, job: UpstreamJob, dest: Path) -> list[Path]:
        """Fetch the job's inputs (sandbox, input data) into the folder ``dest``; returns the files."""
        ...

    def report_status(self, job: UpstreamJob, status: UpstreamStatus) -> None:
        """Tell the upstream the job's state; UpstreamError if it did not take it."""
        ...

    def set_parameters(self, job: UpstreamJob, params: Mapping[str, str | int | float]) -> None:
        """Attach facts to the upstream's job (the Airlock job, its tasks, volunteers and hosts)."""
        ...

    def heartbeat(self, job: UpstreamJob, metrics: Mapping[str, str | int | float]) -> Mapping[str, str]:
        """A sign of life of a job in flight; returns the upstream's commands for it (e.g. ``Kill``)."""
        ...

    def upload_output_sandbox(self, job: UpstreamJob, files: Sequence[Path]) -> str | None:
        """Hand the validated output sandbox back, as the job's owner; returns its reference."""
        ...

    def output_registered(self, job: UpstreamJob, output: OutputFile) -> bool:
        """Whether ``output`` is already registered (so a redo after a crash does not duplicate it)."""
        ...

    def register_output(self, job: UpstreamJob, output: OutputFile, path: Path) -> None:
        """Upload one validated output file to its storage element and register it in the catalog."""
        ...

    def reschedule(self, job: UpstreamJob) -> None:
        """Give the job back to the upstream's queue (Airlock could not finish it)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class InputSizing(Protocol):
    """An upstream that knows its jobs' input sizes before they are downloaded."""

    def input_sizes(self, job: UpstreamJob) -> Mapping[str, int | None]:
        """The size in bytes of each of ``job.inputs`` (None where the upstream cannot tell), fetching
        none of them. A sandbox's size may be its packed (compressed) size: a lower bound of what it
        unpacks to."""
        ...


@runtime_checkable
class OutputSandboxListing(Protocol):
    """An upstream that lists the output sandboxes it holds for a job."""

    def output_sandboxes(self, job: UpstreamJob) -> Sequence[str]:
        """References of the output sandboxes assigned to the job upstream (as
        ``upload_output_sandbox`` returns them)."""
        ...
