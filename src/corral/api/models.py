"""Request and response bodies of the /v1 API (pydantic; the OpenAPI schema comes from here).

Exec output travels as NDJSON, one `ExecEventBody` per line, bytes base64-encoded
so any output survives; the last line is always the `exit` event.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

if TYPE_CHECKING:
    from corral.backends.base import SandboxStats
    from corral.runtime.pools import PoolStatus
    from corral.store import SandboxRecord

API_PREFIX = "/v1"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
TAR_MEDIA_TYPE = "application/x-tar"
# On a /run response: the id of the sandbox the command runs in.
SANDBOX_ID_HEADER = "Corral-Sandbox-Id"

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
Key = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Value = Annotated[str, StringConstraints(max_length=4096)]
Size = Annotated[str, StringConstraints(min_length=1, max_length=32)] | Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishPort(_Body):
    """A TCP port inside the sandbox to publish on the server's host: on `host_ip`
    (an address the operator allows; the first of them if null) at `host_port`
    (0: a free port, reported in the sandbox's `ports`)."""

    container_port: int = Field(ge=1, le=65535)
    host_port: int = Field(default=0, ge=0, le=65535)
    host_ip: str | None = Field(default=None, max_length=45)


class PublishedPort(BaseModel):
    container_port: int
    host_port: int
    host_ip: str


class SandboxCreate(_Body):
    """A new sandbox. `template` names a template the server knows; `template_spec`
    carries a whole template (the parsed TOML) instead, without host mounts."""

    template: str = Field(default="default", max_length=255)
    template_spec: dict[str, Any] | None = None
    runtime: str | None = Field(default=None, max_length=32)
    memory: Size | None = None
    cpus: float | None = Field(default=None, gt=0, le=256)
    pids: int | None = Field(default=None, ge=8, le=1 << 22)
    disk: Size | None = None
    cpuset: str | None = Field(default=None, max_length=64)
    timeout: float | None = Field(default=None, gt=0, le=30 * 86400)
    env: dict[Key, Value] = Field(default_factory=dict)
    labels: dict[Key, Value] = Field(default_factory=dict)
    metadata: dict[Key, Any] = Field(default_factory=dict)
    name: Name | None = None
    ports: list[PublishPort] = Field(default_factory=list, max_length=32)


class SandboxPatch(_Body):
    """Labels and metadata to merge in; a null value removes that key."""

    labels: dict[Key, Value | None] = Field(default_factory=dict)
    metadata: dict[Key, Any] = Field(default_factory=dict)


class TimeoutUpdate(_Body):
    """The sandbox is reaped `seconds` from now (set or extend)."""

    seconds: float = Field(gt=0, le=30 * 86400)


class Sandbox(BaseModel):
    id: str
    name: str | None
    tenant: str
    template: str
    backend: str
    runtime: str | None
    state: str
    kind: str
    image_digest: str | None
    created_at: float
    expires_at: float | None
    labels: dict[str, str]
    metadata: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    pool: str | None = None  # the warm pool it idles in, until claimed
    restarts: int = 0  # pets: restarts by the restart policy
    pet: dict[str, Any] | None = None  # pets: restart policy, volume, service
    ports: list[PublishedPort] = Field(default_factory=list)  # as bound on the host

    @classmethod
    def from_record(cls, record: SandboxRecord) -> Sandbox:
        return cls(
            id=record.id,
            name=record.name,
            tenant=record.tenant,
            template=record.template,
            backend=record.backend,
            runtime=record.runtime,
            state=record.state,
            kind=record.kind,
            image_digest=record.image_digest,
            created_at=record.created_at,
            expires_at=record.expires_at,
            labels=dict(record.labels),
            metadata=dict(record.metadata),
            limits=dict(record.limits),
            error=record.error,
            pool=record.pool,
            restarts=record.restarts,
            pet=_pet_facts(record),
            ports=[PublishedPort(**p) for p in record.spec.get("ports", ())],
        )


def _pet_facts(record: SandboxRecord) -> dict[str, Any] | None:
    pet = record.spec.get("pet")
    if pet is None:
        return None
    return {k: v for k, v in pet.items() if k != "template"}


class PetCreate(SandboxCreate):
    """A pet: a sandbox with a stable name, a persistent volume (`volume` bytes, or
    the template's [volume]), a restart policy and CPUs of its own; the template's
    [service], if any, runs as its main process."""

    name: Name
    volume: Size | None = None
    restart: Literal["always", "on-failure"] | None = None


class Promotion(_Body):
    """Make a running ephemeral sandbox a pet named `name`; with `volume` it is
    re-created with a volume (its workdir and home carried over)."""

    name: Name
    volume: Size | None = None
    restart: Literal["always", "on-failure"] | None = None


class ExecBody(_Body):
    argv: list[Annotated[str, StringConstraints(max_length=131072)]] = Field(min_length=1)
    env: dict[Key, Value] = Field(default_factory=dict)
    cwd: str | None = Field(default=None, max_length=4096)
    stdin: str | None = Field(default=None, description="base64 bytes fed to the command")
    timeout: float | None = Field(default=None, gt=0, le=86400)

    def stdin_bytes(self) -> bytes | None:
        return None if self.stdin is None else base64.b64decode(self.stdin, validate=True)


class RunBody(ExecBody):
    """A one-shot command: a sandbox made as `sandbox` says (or claimed from warm pool
    `pool`, which fixes the template and limits: only the sandbox's timeout, labels,
    metadata and name apply then), the command run in it, and the sandbox destroyed
    once it ends - also when the client goes away first."""

    sandbox: SandboxCreate = Field(default_factory=SandboxCreate)
    pool: Name | None = None


# The fields of `RunBody.sandbox` a claim from a pool honours (those of ClaimBody).
CLAIM_FIELDS = frozenset({"timeout", "labels", "metadata", "name"})


class ExecEventBody(BaseModel):
    """One NDJSON line: output (`stdout`/`stderr`, base64 `data`) or the final `exit`."""

    type: Literal["stdout", "stderr", "exit"]
    data: str | None = None
    exit_code: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration: float | None = None
    reason: str | None = None
    # On an `exit` line with exit_code -1: the server failed after the stream began.
    problem: dict[str, Any] | None = None


class Stats(BaseModel):
    memory_bytes: int
    memory_limit: int
    cpu_seconds: float
    pids: int
    pids_limit: int
    oom_kills: int = 0

    @classmethod
    def from_stats(cls, stats: SandboxStats) -> Stats:
        return cls(
            memory_bytes=stats.memory_bytes,
            memory_limit=stats.memory_limit,
            cpu_seconds=stats.cpu_seconds,
            pids=stats.pids,
            pids_limit=stats.pids_limit,
            oom_kills=stats.oom_kills,
        )


class Inspection(BaseModel):
    """A sandbox's record, what its backend reports now, and (while running) its usage."""

    sandbox: Sandbox
    backend_status: str
    stats: Stats | None = None


class TemplateInfo(BaseModel):
    name: str
    description: str
    base: str
    isolation: list[str]
    kind: str
    resources: dict[str, Any]
    timeout: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    backend: str | None = None
    checks: dict[str, str] = Field(default_factory=dict)


class Quota(BaseModel):
    max_sandboxes: int | None = None
    max_vcpus: float | None = None
    max_memory: int | None = None


class Usage(BaseModel):
    sandboxes: int
    vcpus: float
    memory: int


class TenantInfo(BaseModel):
    name: str
    quota: Quota
    usage: Usage


class PoolCreate(_Body):
    """A warm pool of `size` sandboxes of a template, kept ready to be claimed."""

    name: Name
    template: str = Field(default="default", max_length=255)
    template_spec: dict[str, Any] | None = None
    size: int = Field(ge=0, le=1000)
    max_idle: float | None = Field(
        default=None, gt=0, le=30 * 86400, description="seconds before an idle member is replaced"
    )
    snapshot: bool = Field(
        default=False, description="members wait snapshotted and are restored on claim"
    )
    runtime: str | None = Field(default=None, max_length=32)
    memory: Size | None = None
    cpus: float | None = Field(default=None, gt=0, le=256)
    pids: int | None = Field(default=None, ge=8, le=1 << 22)
    disk: Size | None = None
    cpuset: str | None = Field(default=None, max_length=64)
    env: dict[Key, Value] = Field(default_factory=dict)
    labels: dict[Key, Value] = Field(default_factory=dict)


class PoolPatch(_Body):
    size: int = Field(ge=0, le=1000)


class PoolInfo(BaseModel):
    name: str
    tenant: str
    template: str
    backend: str | None
    runtime: str | None
    size: int
    idle: int
    starting: int
    max_idle: float | None
    snapshot: bool = False
    resources: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: float
    error: str | None = None

    @classmethod
    def from_status(cls, status: PoolStatus) -> PoolInfo:
        pool = status.pool
        return cls(
            name=pool.name,
            tenant=pool.tenant,
            template=pool.template,
            backend=pool.backend,
            runtime=pool.runtime,
            size=pool.target_size,
            idle=status.idle,
            starting=status.starting,
            max_idle=pool.max_idle_seconds,
            snapshot=pool.snapshot,
            resources=dict(pool.spec.get("resources", {})),
            labels=dict(pool.spec.get("labels", {})),
            created_at=pool.created_at,
            error=status.error,
        )


class PoolRemoved(BaseModel):
    destroyed: list[str]


class ClaimBody(_Body):
    """The claimant's settings for the sandbox it gets (the pool fixed the rest)."""

    timeout: float | None = Field(default=None, gt=0, le=30 * 86400)
    labels: dict[Key, Value] = Field(default_factory=dict)
    metadata: dict[Key, Any] = Field(default_factory=dict)
    name: Name | None = None


class ClaimResult(BaseModel):
    sandbox: Sandbox
    pool: str
    from_pool: bool = Field(description="false: the pool was empty and it was created cold")
    seconds: float


class Problem(BaseModel):
    """RFC 9457 problem details, with Corral's facts as extension members."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    sandbox_id: str | None = None
    backend: str | None = None
    hint: str | None = None
    stderr_tail: str | None = None
