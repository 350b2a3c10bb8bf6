"""Every API call as data (method, path, params, body), checked against the wire
models before anything is sent; the clients send them (no I/O here)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote

from pydantic import ValidationError

from corral.api import models
from corral.backends.ports import split_port
from corral.client._base import Call, ModelT
from corral.client._events import argv_list, stdin_base64
from corral.errors import NotFoundError, TemplateError, UserError

# Creating may realize the template first; an mmdebstrap image build takes minutes.
CREATE_TIMEOUT = 900.0
# Read time allowed past an exec's own timeout, for the server to kill it and report.
EXEC_TIMEOUT_MARGIN = 60.0


class RunOptions(TypedDict, total=False):
    """The sandbox's optional fields for `run` (where `env` and `timeout` are the
    command's); `SandboxOptions` adds those two."""

    runtime: str
    memory: str | int
    cpus: float
    pids: int
    disk: str | int
    cpuset: str
    labels: Mapping[str, str]
    metadata: Mapping[str, Any]
    name: str
    # Published on the server's host: 8080, "18080:8080", "127.0.0.1:0:8080", or
    # {"container_port": 8080, "host_port": 0, "host_ip": ...}.
    ports: Sequence[int | str | Mapping[str, Any]]


class SandboxOptions(RunOptions, total=False):
    """The optional fields of a new sandbox (see `corral.api.models.SandboxCreate`)."""

    timeout: float
    env: Mapping[str, str]


def _port_fields(port: int | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(port, Mapping):
        return port
    if isinstance(port, int):
        return {"container_port": port}
    host_ip, host_port, container_port = split_port(port)
    fields: dict[str, Any] = {"container_port": container_port, "host_port": host_port}
    if host_ip is not None:
        fields["host_ip"] = host_ip
    return fields


def _sandbox_fields(options: RunOptions) -> dict[str, Any]:
    fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if "ports" in fields:
        fields["ports"] = [_port_fields(p) for p in fields["ports"]]
    return fields


def _sandbox_path(sandbox_id: str, tail: str = "") -> str:
    return f"{models.API_PREFIX}/sandboxes/{quote(sandbox_id, safe='')}{tail}"


def _validated(model: type[ModelT], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The JSON body for `fields`, checked against the wire model before it is sent."""
    try:
        body = model.model_validate(dict(fields))
    except ValidationError as exc:
        issues = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc']) or 'body'}: {issue['msg']}"
            for issue in exc.errors()[:5]
        )
        raise UserError(f"invalid {what}: {issues}") from None
    return body.model_dump(mode="json", exclude_unset=True)


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise UserError(
            f"'{path}' is not an absolute path", hint="paths inside a sandbox start with '/'"
        )
    return path


def health_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/health")


def ready_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/ready")


def templates_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/templates")


def tenant_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/tenants/me")


def tenants_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/tenants")


def create_call(template: str | os.PathLike[str], options: SandboxOptions) -> Call:
    """A named template is sent by name; a local .toml file is read and sent whole."""
    fields = _sandbox_fields(options)
    fields.update(template_fields(template))
    body = _validated(models.SandboxCreate, fields, "sandbox settings")
    return Call(
        "POST",
        f"{models.API_PREFIX}/sandboxes",
        json=body,
        read_timeout=CREATE_TIMEOUT,
    )


def template_fields(template: str | os.PathLike[str]) -> dict[str, Any]:
    """A named template goes by name; a local .toml file (a path) is read and sent whole."""
    if isinstance(template, os.PathLike) or template.endswith(".toml") or "/" in template:
        spec = read_template_file(Path(template))
        return {"template_spec": spec, "template": str(spec.get("name") or Path(template).stem)}
    return {"template": template}


def read_template_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise NotFoundError(
            f"template file '{path}' does not exist",
            hint="check the path, or name a template the server knows (Corral.templates())",
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(
            f"cannot read it: {exc}", file=str(path), hint="fix the TOML syntax"
        ) from None


def list_call(state: str | None, labels: Mapping[str, str] | None, tenant: str | None) -> Call:
    params: list[tuple[str, str]] = []
    if state is not None:
        params.append(("state", state))
    params.extend(("label", f"{key}={value}") for key, value in (labels or {}).items())
    if tenant is not None:
        params.append(("tenant", tenant))
    return Call("GET", f"{models.API_PREFIX}/sandboxes", params=tuple(params))


def get_call(sandbox_id: str) -> Call:
    return Call("GET", _sandbox_path(sandbox_id), sandbox_id=sandbox_id)


def destroy_call(sandbox_id: str) -> Call:
    return Call("DELETE", _sandbox_path(sandbox_id), sandbox_id=sandbox_id)


def patch_call(
    sandbox_id: str,
    labels: Mapping[str, str | None] | None,
    metadata: Mapping[str, Any] | None,
) -> Call:
    fields: dict[str, Any] = {}
    if labels is not None:
        fields["labels"] = dict(labels)
    if metadata is not None:
        fields["metadata"] = dict(metadata)
    body = _validated(models.SandboxPatch, fields, "labels or metadata")
    return Call("PATCH", _sandbox_path(sandbox_id), json=body, sandbox_id=sandbox_id)


def timeout_call(sandbox_id: str, seconds: float) -> Call:
    body = _validated(models.TimeoutUpdate, {"seconds": seconds}, "timeout")
    return Call("PUT", _sandbox_path(sandbox_id, "/timeout"), json=body, sandbox_id=sandbox_id)


def pause_call(sandbox_id: str) -> Call:
    return Call("POST", _sandbox_path(sandbox_id, "/pause"), sandbox_id=sandbox_id)


def resume_call(sandbox_id: str) -> Call:
    return Call("POST", _sandbox_path(sandbox_id, "/resume"), sandbox_id=sandbox_id)


def stats_call(sandbox_id: str) -> Call:
    return Call("GET", _sandbox_path(sandbox_id, "/stats"), sandbox_id=sandbox_id)


def inspect_call(sandbox_id: str) -> Call:
    return Call("GET", _sandbox_path(sandbox_id, "/inspect"), sandbox_id=sandbox_id)


def exec_body(
    argv: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"argv": argv_list(argv)}
    if env:
        fields["env"] = dict(env)
    if cwd is not None:
        fields["cwd"] = cwd
    if stdin is not None:
        fields["stdin"] = stdin_base64(stdin)
    if timeout is not None:
        fields["timeout"] = timeout
    return _validated(models.ExecBody, fields, "command")


def exec_call(
    sandbox_id: str,
    argv: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> Call:
    return Call(
        "POST",
        _sandbox_path(sandbox_id, "/exec"),
        json=exec_body(argv, env, cwd, stdin, timeout),
        # Without a timeout a command may stay silent for as long as it likes.
        read_timeout=None if timeout is None else timeout + EXEC_TIMEOUT_MARGIN,
        sandbox_id=sandbox_id,
    )


def run_call(
    argv: str | Sequence[str],
    template: str | os.PathLike[str],
    *,
    pool: str | None,
    options: RunOptions,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> Call:
    """One request that makes a sandbox (or claims one from `pool`), runs the command
    and destroys the sandbox. The sandbox outlives a command timeout by the margin
    only: were the server to stop mid-run, the reaper removes it then."""
    if pool is not None:
        sandbox: dict[str, Any] = dict(claim_options(options))
    else:
        sandbox = _sandbox_fields(options)
        sandbox.update(template_fields(template))
    if timeout is not None:
        sandbox.setdefault("timeout", timeout + EXEC_TIMEOUT_MARGIN)
    fields = exec_body(argv, env, cwd, stdin, timeout) | {"sandbox": sandbox}
    if pool is not None:
        fields["pool"] = pool
    body = _validated(models.RunBody, fields, "run")
    # The first line comes once the sandbox runs (creating may build the image); after
    # that a command without a timeout may stay silent as long as it likes.
    return Call(
        "POST",
        f"{models.API_PREFIX}/run",
        json=body,
        read_timeout=None if timeout is None else CREATE_TIMEOUT + timeout + EXEC_TIMEOUT_MARGIN,
    )


def exec_ws_path(sandbox_id: str) -> str:
    return _sandbox_path(sandbox_id, "/exec/ws")


def write_file_call(sandbox_id: str, path: str, data: bytes | str, mode: int) -> Call:
    if not 0 <= mode <= 0o7777:
        raise UserError(f"mode {mode:#o} is not a file mode", hint="use e.g. 0o644 or 0o755")
    return Call(
        "PUT",
        _sandbox_path(sandbox_id, "/files"),
        params=(("path", _absolute(path)), ("mode", format(mode, "o"))),
        content=data.encode() if isinstance(data, str) else bytes(data),
        content_type="application/octet-stream",
        sandbox_id=sandbox_id,
    )


def read_file_call(sandbox_id: str, path: str) -> Call:
    return Call(
        "GET",
        _sandbox_path(sandbox_id, "/files"),
        params=(("path", _absolute(path)),),
        sandbox_id=sandbox_id,
    )


def put_archive_call(sandbox_id: str, path: str, tar: bytes) -> Call:
    return Call(
        "PUT",
        _sandbox_path(sandbox_id, "/archive"),
        params=(("path", _absolute(path)),),
        content=tar,
        content_type=models.TAR_MEDIA_TYPE,
        sandbox_id=sandbox_id,
    )


def get_archive_call(sandbox_id: str, path: str) -> Call:
    return Call(
        "GET",
        _sandbox_path(sandbox_id, "/archive"),
        params=(("path", _absolute(path)),),
        sandbox_id=sandbox_id,
    )


class ClaimOptions(TypedDict, total=False):
    """The claimant's settings for a sandbox taken from a pool (`models.ClaimBody`)."""

    timeout: float
    labels: Mapping[str, str]
    metadata: Mapping[str, Any]
    name: str


class PoolOptions(TypedDict, total=False):
    """The optional fields of a new pool (see `corral.api.models.PoolCreate`)."""

    max_idle: float
    snapshot: bool
    runtime: str
    memory: str | int
    cpus: float
    pids: int
    disk: str | int
    cpuset: str
    env: Mapping[str, str]
    labels: Mapping[str, str]


def _pool_path(name: str, tail: str = "") -> str:
    return f"{models.API_PREFIX}/pools/{quote(name, safe='')}{tail}"


def claim_options(options: Mapping[str, Any]) -> ClaimOptions:
    """`options` of `sandbox(from_pool=...)`: only what a claimant may set."""
    fixed = sorted(
        k for k, v in options.items() if v is not None and k not in ClaimOptions.__annotations__
    )
    if fixed:
        raise UserError(
            f"{', '.join(fixed)}: the pool fixes these for its sandboxes",
            hint="a claim sets only timeout, labels, metadata and name",
        )
    claim: ClaimOptions = {}
    for key in ("timeout", "labels", "metadata", "name"):
        if options.get(key) is not None:
            claim[key] = options[key]
    return claim


def claim_call(pool: str, options: ClaimOptions) -> Call:
    body = _validated(models.ClaimBody, dict(options), "claim settings")
    # An empty pool falls back to a cold create, which may build the image first.
    return Call("POST", _pool_path(pool, "/claim"), json=body, read_timeout=CREATE_TIMEOUT)


def pool_create_call(
    name: str, template: str | os.PathLike[str], size: int, options: PoolOptions
) -> Call:
    fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    fields.update(name=name, size=size)
    fields.update(template_fields(template))
    body = _validated(models.PoolCreate, fields, "pool settings")
    return Call("POST", f"{models.API_PREFIX}/pools", json=body, read_timeout=CREATE_TIMEOUT)


def pools_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/pools")


def pool_call(name: str) -> Call:
    return Call("GET", _pool_path(name))


def pool_resize_call(name: str, size: int) -> Call:
    body = _validated(models.PoolPatch, {"size": size}, "pool size")
    return Call("PATCH", _pool_path(name), json=body)


def pool_delete_call(name: str) -> Call:
    return Call("DELETE", _pool_path(name))


# -- pets ---------------------------------------------------------------------


def pet_create_call(
    template: str | os.PathLike[str],
    *,
    volume: str | int | None,
    restart: str | None,
    options: SandboxOptions,
) -> Call:
    """Like `create_call`, for a pet (POST /v1/pets); `options` must name it."""
    if not options.get("name"):
        raise UserError("a pet needs a name", hint="pass name=... (unique among your sandboxes)")
    fields = _sandbox_fields(options)
    fields.update({k: v for k, v in (("volume", volume), ("restart", restart)) if v is not None})
    fields.update(template_fields(template))
    body = _validated(models.PetCreate, fields, "pet settings")
    return Call("POST", f"{models.API_PREFIX}/pets", json=body, read_timeout=CREATE_TIMEOUT)


def promote_call(sandbox_id: str, name: str, volume: str | int | None, restart: str | None) -> Call:
    fields = {"name": name, "volume": volume, "restart": restart}
    body = _validated(
        models.Promotion, {k: v for k, v in fields.items() if v is not None}, "promotion"
    )
    return Call(
        "POST",
        _sandbox_path(sandbox_id, "/promote"),
        json=body,
        read_timeout=CREATE_TIMEOUT,
        sandbox_id=sandbox_id,
    )


def restart_call(sandbox_id: str) -> Call:
    return Call("POST", _sandbox_path(sandbox_id, "/restart"), sandbox_id=sandbox_id)


def logs_call(sandbox_id: str, *, follow: bool, tail: int | None) -> Call:
    params: list[tuple[str, str]] = [("follow", "true" if follow else "false")]
    if tail is not None:
        params.append(("tail", str(tail)))
    return Call(
        "GET",
        _sandbox_path(sandbox_id, "/logs"),
        params=tuple(params),
        read_timeout=None if follow else "client",
        sandbox_id=sandbox_id,
    )


def volume_delete_call(name: str) -> Call:
    return Call("DELETE", f"{models.API_PREFIX}/volumes/{quote(name, safe='')}")
