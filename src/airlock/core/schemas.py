"""Pydantic models of everything that crosses the HTTP boundary: the API contract.

Unknown fields are refused everywhere (`extra="forbid"`) so a typo in a job description is an error,
not a silently ignored setting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Names of files inside a task's work directory: one path component, no hidden files, no separators.
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX8 = re.compile(r"^[0-9a-f]{8}$")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?i?[bB]?)\s*$")
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


INT32 = 2**31 - 1  # INTEGER columns are 32-bit on PostgreSQL
DbId = Annotated[int, Field(ge=1, le=INT32)]
Count = Annotated[int, Field(ge=0, le=INT32)]
Seconds = Annotated[float, Field(ge=0, le=10**9, allow_inf_nan=False)]


def parse_size(value: int | str) -> int:
    """Accept 1048576, "10MB", "2 GiB", "512k"; return bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as '10MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"cannot read size {value!r}: use bytes or a unit such as '10MB', '2GiB'")
    unit = m.group(2).lower().rstrip("b")
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def check_file_name(name: str) -> str:
    if not FILE_NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"file name {name!r} must be one path component of letters, digits, '_', '.', '+' or '-'"
        )
    return name


FileName = Annotated[str, AfterValidator(check_file_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ----------------------------------------------------------------------------------------- job description


class InputSpec(Strict):
    """An input file. Give `sha256` of a file already in the input cache (see POST /api/v1/inputs);
    the CLI also accepts `path` and uploads the file first."""

    name: FileName
    sha256: str
    size: int | None = Field(default=None, ge=0)
    adler32: str | None = None

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not HEX64.match(v):
            raise ValueError("sha256 must be 64 hex digits")
        return v

    @field_validator("adler32")
    @classmethod
    def _adler(cls, v: str | None) -> str | None:
        if v is not None and not HEX8.match(v.lower()):
            raise ValueError("adler32 must be 8 hex digits")
        return v.lower() if v else v


class OutputSpec(Strict):
    name: FileName
    max_size: int

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        size = parse_size(v)
        if size <= 0:
            raise ValueError("max_size must be positive")
        return size


class Resources(Strict):
    cores: int = Field(default=1, ge=1, le=256)
    memory_mb: int = Field(default=512, ge=16, le=INT32)
    disk_mb: int = Field(default=256, ge=1, le=INT32)
    runtime_s: int = Field(
        default=3600, ge=1, le=10**7, description="estimated runtime; the sandbox's time limit is 4x this"
    )


def non_finite_number(value: Any, where: str) -> str | None:
    """Where in `value` an infinite or NaN float is (JSON has none), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_number(item, f"{where}.{key}")
        if found is not None:
            return found
    return None


class JobSpec(Strict):
    name: str = Field(min_length=1, max_length=200)
    app: str | None = Field(default=None, description="selects the app's validator check and comparator")
    command: list[str] = Field(min_length=1, description="argv run in the task's work directory")
    image: str | None = Field(default=None, description="container image (recorded; the agent runs natively)")
    env: dict[str, str] = Field(default_factory=dict)
    inputs: list[InputSpec] = Field(default_factory=list)
    outputs: list[OutputSpec] = Field(min_length=1)
    resources: Resources = Field(default_factory=Resources)
    copies: int = Field(default=1, ge=1, le=16, description="tasks issued at once, on distinct volunteers")
    quorum: int = Field(default=1, ge=1, le=16, description="agreeing valid results needed")
    max_attempts: int = Field(default=5, ge=1, le=100, description="tasks a job may use before it fails")
    deadline_s: int = Field(
        default=86400, ge=10, le=10**8, description="report deadline of each task after its lease"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="app parameters, seen by the validator")

    @field_validator("params")
    @classmethod
    def _json_numbers(cls, params: dict[str, Any]) -> dict[str, Any]:
        where = non_finite_number(params, "params")
        if where is not None:
            raise ValueError(f"{where} is not a number JSON can hold (infinite or NaN)")
        return params

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.quorum > self.copies:
            raise ValueError(f"quorum ({self.quorum}) cannot exceed copies ({self.copies})")
        if self.max_attempts < self.copies:
            raise ValueError(f"max_attempts ({self.max_attempts}) must be at least copies ({self.copies})")
        names = [f.name for f in self.inputs] + [f.name for f in self.outputs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"file names must be unique within a job: {sorted(dup)}")
        return self


class BatchSpec(Strict):
    name: str = Field(min_length=1, max_length=200)
    owner: str | None = None
    upstream: str = Field(default="airlock")
    upstream_ref: str | None = None
    jobs: list[JobSpec] = Field(min_length=1, max_length=100_000)

    @model_validator(mode="after")
    def _unique(self) -> BatchSpec:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"job name {job.name!r} appears twice in the batch")
            seen.add(job.name)
        return self


def merge_defaults(document: dict[str, Any]) -> dict[str, Any]:
    """A description may carry `defaults:` merged (shallowly, `resources` and `params` one level deeper)
    into every job; returns a plain BatchSpec document."""
    doc = dict(document)
    defaults = doc.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ValueError("'defaults' must be a mapping")
    jobs = doc.get("jobs")
    if isinstance(jobs, list) and defaults:
        merged = []
        for job in jobs:
            if not isinstance(job, dict):
                merged.append(job)
                continue
            out = {**defaults, **job}
            for key in ("resources", "params", "env"):
                if isinstance(defaults.get(key), dict) and isinstance(job.get(key), dict):
                    out[key] = {**defaults[key], **job[key]}
            merged.append(out)
        doc["jobs"] = merged
    return doc


# ------------------------------------------------------------------------------------------- responses


class BatchCreated(BaseModel):
    batch_id: int
    jobs: list[int]


class InputStored(BaseModel):
    sha256: str
    adler32: str
    size: int


class JobView(BaseModel):
    id: int
    batch_id: int
    name: str
    app: str | None
    state: str
    attempts: int
    copies: int
    quorum: int
    canonical_task_id: int | None
    created_at: datetime
    finished_at: datetime | None
    tasks: list[TaskView] = Field(default_factory=list)
    outputs: list[FileView] = Field(default_factory=list)


class TaskView(BaseModel):
    id: int
    job_id: int
    state: str
    volunteer_id: int | None
    host_id: int | None
    leased_at: datetime | None
    reported_at: datetime | None
    exit_code: int | None
    verdict: str | None


class FileView(BaseModel):
    name: str
    size: int
    adler32: str
    sha256: str
    state: str
    task_id: int | None
    volunteer_id: int | None
    host_id: int | None


class BatchView(BaseModel):
    id: int
    name: str
    owner: str | None
    upstream: str
    upstream_ref: str | None
    created_at: datetime
    jobs_by_state: dict[str, int]


class VolunteerView(BaseModel):
    id: int
    name: str
    state: str
    created_at: datetime
    hosts: int = 0


class HostView(BaseModel):
    id: int
    volunteer_id: int
    name: str | None
    platform: str
    cores: int
    memory_mb: int
    disk_mb: int
    daily_quota: int
    dispatched_today: int
    n_valid: int
    n_invalid: int
    n_error: int
    n_lost: int
    last_seen: datetime | None


# -------------------------------------------------------------------------------------- volunteer side


class VolunteerRegistration(Strict):
    name: str = Field(min_length=2, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password: str = Field(min_length=8, max_length=1024)
    email: str | None = Field(default=None, max_length=254)


class Login(Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    scope: str


class HostRegistration(Strict):
    name: str | None = Field(default=None, max_length=128)
    platform: str = Field(min_length=1, max_length=64, examples=["x86_64-pc-linux-gnu"])
    cores: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=1, le=INT32)
    disk_mb: int = Field(ge=1, le=INT32)


class HostRegistered(BaseModel):
    host_id: DbId
    daily_quota: int


class WorkRequest(Strict):
    host_id: DbId
    slots: int = Field(default=1, ge=1, le=64, description="how many tasks the host can start now")
    free_cores: int | None = Field(default=None, ge=0, le=INT32)
    free_memory_mb: int | None = Field(default=None, ge=0, le=INT32)
    free_disk_mb: int | None = Field(default=None, ge=0, le=INT32)


class InputRef(BaseModel):
    name: str
    url: str
    size: int
    adler32: str
    sha256: str


class OutputRef(BaseModel):
    name: str
    max_size: int
    upload_url: str


class TaskAssignment(BaseModel):
    task_id: int
    job_id: int
    app: str | None
    command: list[str]
    env: dict[str, str]
    inputs: list[InputRef]
    outputs: list[OutputRef]
    resources: Resources
    lease_expires_at: datetime
    deadline: datetime
    heartbeat_interval_s: int
    upload_token: str


class WorkReply(BaseModel):
    tasks: list[TaskAssignment]
    retry_after_s: int
    message: str | None = None


class Heartbeat(Strict):
    host_id: DbId


class HeartbeatReply(BaseModel):
    lease_expires_at: datetime
    abort: bool = False
    upload_token: str | None = Field(
        default=None,
        description="a fresh upload token for the task (the one in the assignment lasts upload_token_ttl_s)",
    )


class OutputReport(Strict):
    name: FileName
    size: int = Field(ge=0, le=2**62)
    adler32: str = Field(pattern=r"^[0-9a-f]{8}$", description="8 lowercase hex digits")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex digits")


class TaskReport(Strict):
    host_id: DbId
    exit_code: int = Field(ge=-(2**31), le=INT32)
    cpu_time_s: Seconds = 0.0
    wall_time_s: Seconds = 0.0
    stderr_tail: Annotated[str, Field(max_length=65536)] = ""
    outputs: list[OutputReport] = Field(default_factory=list, max_length=256)


class ReportAccepted(BaseModel):
    task_id: int
    state: str


class UploadAccepted(BaseModel):
    path: str
    size: int
    adler32: str
    sha256: str


class ErrorBody(BaseModel):
    error: str
    message: str
    detail: Any = None


JobView.model_rebuild()
