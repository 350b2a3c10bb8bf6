"""What a create is allowed to ask for: runtime by isolation policy, limits checked like
a template's, the template's host mounts, and the tenant's quota."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from corral.backends.base import Backend, HostMount, SandboxLimits
from corral.errors import IsolationPolicyError, NotFoundError, QuotaExceededError, UserError
from corral.runtime.hostpaths import resolve_mount_source
from corral.spec.template import Isolation, Resources, Template
from corral.store import Quota, Usage

RUNTIME_ISOLATION = {
    "crun": Isolation.CONTAINER,
    "runc": Isolation.CONTAINER,
    "runsc": Isolation.GVISOR,
}


def choose_runtime(
    backend: Backend, spec: Template, runtime: str | None, default_runtime: str | None
) -> str | None:
    """The runtime for a sandbox of `spec`: the one asked for, if the template
    allows its isolation level; else the template's first allowed level that
    this backend gives (so a template's `isolation` order is its default)."""
    known = backend.runtimes
    if runtime is not None and runtime not in known:
        raise UserError(
            f"backend '{backend.name}' has no runtime '{runtime}'",
            backend=backend.name,
            hint=f"choose one of: {', '.join(known)}"
            if known
            else "leave the runtime out"
            + (" (pick the VMM with --vmm)" if backend.name == "microvm" else ""),
        )
    if backend.name == "microvm":
        require_level(backend, spec, Isolation.MICROVM)
        return runtime
    if runtime is not None:
        require_level(backend, spec, RUNTIME_ISOLATION.get(runtime, Isolation.CONTAINER))
        return runtime
    container_runtime = default_runtime or "crun"
    for level in spec.isolation:
        if level == Isolation.GVISOR:
            return "runsc"
        if level == RUNTIME_ISOLATION.get(container_runtime, Isolation.CONTAINER):
            return container_runtime
    require_level(backend, spec, RUNTIME_ISOLATION.get(container_runtime, Isolation.CONTAINER))
    return container_runtime


def require_level(backend: Backend, spec: Template, level: Isolation) -> None:
    if level not in spec.isolation:
        raise IsolationPolicyError(
            f"template '{spec.name}' does not allow isolation '{level}'"
            f" (allowed: {', '.join(spec.isolation)})",
            backend=backend.name,
            hint="choose a runtime or backend that gives an allowed level",
        )


def template_mounts(spec: Template, image_mounts: Sequence[HostMount]) -> builtins.list[HostMount]:
    """The image's host mounts and the template's [[mounts]], resolved on this host."""
    mounts = list(image_mounts)
    for mount in spec.mounts:
        source = resolve_mount_source(mount.source)
        if source is None or not source.exists():
            if mount.optional:
                continue
            raise NotFoundError(
                f"template '{spec.name}': mount source '{mount.source}' does not exist",
                hint="create it, or mark the mount optional = true",
            )
        if any(source == m.source and mount.target == m.target for m in mounts):
            continue
        mounts.append(HostMount(source, mount.target))
    return mounts


def quota_check(tenant: str, quota: Quota, limits: SandboxLimits) -> Callable[[Usage], None]:
    def check(usage: Usage) -> None:
        over = []
        if quota.max_sandboxes is not None and usage.sandboxes + 1 > quota.max_sandboxes:
            over.append(f"{usage.sandboxes + 1} sandboxes (quota {quota.max_sandboxes})")
        if quota.max_vcpus is not None and usage.vcpus + limits.vcpus > quota.max_vcpus + 1e-9:
            over.append(f"{usage.vcpus + limits.vcpus:g} vCPUs (quota {quota.max_vcpus:g})")
        if quota.max_memory is not None and usage.memory + limits.memory > quota.max_memory:
            over.append(
                f"{(usage.memory + limits.memory) >> 20} MiB of memory"
                f" (quota {quota.max_memory >> 20} MiB)"
            )
        if over:
            raise QuotaExceededError(
                f"tenant '{tenant}' would have " + ", ".join(over),
                hint="destroy sandboxes you no longer need, or ask an operator to raise"
                " the quota (`corral tenants quota`)",
            )

    return check


def limits_for(spec: Template, **asked: Any) -> SandboxLimits:
    """The template's resources with the caller's overrides, checked by the same rules
    as a template's [resources] (so a bad size is a clear error, not a runtime failure)."""
    values = spec.resources.model_dump()
    values.update({k: v for k, v in asked.items() if v is not None})
    try:
        resources = Resources.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "resources"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise UserError(
            f"'{where}': {message}",
            hint="e.g. memory 512M (at least 16M), cpus 0.5, pids 8 or more, disk 256M",
        ) from None
    return SandboxLimits(
        vcpus=float(resources.vcpus),
        memory=resources.memory,
        pids=resources.pids,
        disk=resources.disk,
        cpuset=resources.cpuset,
    )
