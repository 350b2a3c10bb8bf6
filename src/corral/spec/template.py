"""Sandbox templates: the declarative definition every image and sandbox comes from.

A template is plain TOML data (the Nix module reads the same file with
`builtins.fromTOML`), validated here into a `Template` and normalized into a
canonical dict whose hash keys the image cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tomllib
from enum import StrEnum
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import BeforeValidator

from corral.errors import NotFoundError, TemplateError
from corral.spec.units import parse_size

__all__ = [
    "BUILTIN_TEMPLATES",
    "FileEntry",
    "HealthCheck",
    "Isolation",
    "Mount",
    "Resources",
    "Service",
    "Template",
    "User",
    "Volume",
    "list_builtin_templates",
    "load_template",
    "parse_template",
]

BASES = ("host", "debian:bookworm", "busybox")
BUILTIN_TEMPLATES = ("default", "rust")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


class Isolation(StrEnum):
    """Isolation levels, weakest first."""

    CONTAINER = "container"
    GVISOR = "gvisor"
    MICROVM = "microvm"


Size = Annotated[int, BeforeValidator(parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Strict):
    name: str = "sandbox"
    uid: int = Field(default=1000, ge=0, lt=65536)
    gid: int = Field(default=1000, ge=0, lt=65536)


class Resources(_Strict):
    vcpus: float = Field(default=1.0, gt=0, le=256)
    memory: Size = Field(default=512 << 20, ge=16 << 20)
    pids: int = Field(default=256, ge=8, le=1 << 22)
    disk: Size = Field(default=256 << 20, ge=1 << 20)
    cpuset: str | None = None

    @field_validator("cpuset")
    @classmethod
    def _cpuset_syntax(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", value):
            raise ValueError(f"'{value}' is not a CPU list like '0', '0-1' or '0,2'")
        return value


class FileEntry(_Strict):
    path: str
    content: str
    mode: str = "0644"

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _absolute_path(value)

    @field_validator("mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3,4}", value):
            raise ValueError(f"'{value}' is not an octal file mode like '0644' or '0755'")
        return value


class Mount(_Strict):
    """A read-only host path made visible inside the sandbox.

    `source` is a host path or `@rust-sysroot` (the host's Rust toolchain, as
    `rustc --print sysroot` reports it). `optional` mounts are skipped when the
    source does not exist on this host.
    """

    source: str
    target: str
    optional: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("@"):
            if value != "@rust-sysroot":
                raise ValueError(f"unknown special source '{value}' (known: @rust-sysroot)")
            return value
        return _absolute_path(value)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return _mount_target(value)


Port = Annotated[int, Field(ge=1, le=65535)]


class Volume(_Strict):
    """A pet's persistent volume: `size` bytes (a hard limit), mounted read-write at `path`."""

    size: Size = Field(default=256 << 20, ge=1 << 20)
    path: str = "/data"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _mount_target(value)


class HealthCheck(_Strict):
    """How the supervisor probes a running service: `exec` a command inside the
    sandbox (healthy when it exits 0) or connect to `tcp` port inside it; `retries`
    failures in a row, `interval` seconds apart, restart the service."""

    exec: tuple[str, ...] | None = None
    tcp: Port | None = None
    interval: float = Field(default=10.0, gt=0)
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_probe(self) -> HealthCheck:
        if (self.exec is None) == (self.tcp is None) or self.exec == ():
            raise ValueError("give exactly one of exec (a command) or tcp (a port)")
        return self


class Service(_Strict):
    """The process a pet runs as its main process, restarted by the supervisor by
    `restart` policy with exponential backoff (`backoff` seconds, doubling up to
    `max_backoff`); `crash_limit` quick failures in a row mark the pet failed."""

    command: tuple[str, ...]
    env: dict[str, str] = Field(default_factory=dict)
    ports: tuple[Port, ...] = ()
    restart: Literal["always", "on-failure"] = "always"
    backoff: float = Field(default=1.0, gt=0)
    max_backoff: float = Field(default=60.0, gt=0)
    crash_limit: int = Field(default=5, ge=1)
    health: HealthCheck | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("the command must name a program")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _env_names(value)


class Template(_Strict):
    """A validated sandbox template (see the module docstring)."""

    name: str
    description: str = ""
    base: str = "host"
    packages: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = "/work"
    user: User = User()
    resources: Resources = Resources()
    network: Literal["none", "egress"] = "none"
    mounts: tuple[Mount, ...] = ()
    isolation: tuple[Isolation, ...] = (Isolation.CONTAINER, Isolation.GVISOR, Isolation.MICROVM)
    kind: Literal["ephemeral", "persistent"] = "ephemeral"
    timeout: int = Field(default=600, ge=1)
    volume: Volume | None = None
    service: Service | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"'{value}' is not a name: use a-z, 0-9, '.', '_', '-' (max 63)")
        return value

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        if value not in BASES:
            raise ValueError(f"unknown base '{value}'")
        return value

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for package in value:
            if not _PACKAGE.fullmatch(package):
                raise ValueError(f"'{package}' is not a Debian package name")
        return tuple(sorted(set(value)))

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _env_names(value)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        return _absolute_path(value)

    @field_validator("isolation")
    @classmethod
    def _isolation(cls, value: tuple[Isolation, ...]) -> tuple[Isolation, ...]:
        if not value:
            raise ValueError("at least one isolation level must be allowed")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> Template:
        if self.packages and self.base != "debian:bookworm":
            raise ValueError(
                f"packages need base 'debian:bookworm' (this template's base is '{self.base}')"
            )
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("two [[files]] entries have the same path")
        return self

    def normalized(self) -> dict[str, Any]:
        """The canonical plain-data form (sizes in bytes, defaults filled, sorted)."""
        data = self.model_dump(mode="json")
        data["files"] = sorted(data["files"], key=lambda f: f["path"])
        return data

    def image_key(self) -> str:
        """sha256 over what determines the image (everything but name, description,
        resources, timeout, kind, service and the volume's size, which only shape
        sandboxes; a volume's path counts: its mount point is made in the image)."""
        data = self.normalized()
        for key in ("name", "description", "resources", "timeout", "kind", "service"):
            data.pop(key)
        volume = data.pop("volume")
        if volume is not None:  # only its mount point; without one, earlier keys hold
            data["volume_path"] = volume["path"]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


_HINTS: dict[str, str] = {
    "name": "set name = \"my-template\" (lowercase letters, digits, '.', '_', '-')",
    "base": f"set base to one of: {', '.join(BASES)}",
    "packages": 'list Debian package names and set base = "debian:bookworm"',
    "files": 'each [[files]] needs an absolute path, content, and an octal mode like "0644"',
    "env": 'use [env] with NAME = "value" string pairs',
    "workdir": 'use an absolute path such as "/work"',
    "user": "use [user] with name, and uid/gid between 0 and 65535",
    "resources": 'e.g. [resources] vcpus = 1, memory = "512M", pids = 256, disk = "256M"',
    "network": 'set network to "none" or "egress"',
    "mounts": "each [[mounts]] needs an absolute source (or @rust-sysroot) and target",
    "isolation": "list one or more of: container, gvisor, microvm",
    "kind": 'set kind to "ephemeral" or "persistent"',
    "timeout": "give the default timeout in whole seconds, at least 1",
    "volume": 'e.g. [volume] size = "256M", path = "/data"',
    "service": 'e.g. [service] command = ["/data/app"], restart = "always";'
    " [service.health] tcp = 7000 or exec = [...]",
}


def _env_names(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"'{key}' is not an environment variable name")
    return dict(sorted(value.items()))


def _mount_target(value: str) -> str:
    value = _absolute_path(value)
    if value == "/" or value.split("/")[1] in {"proc", "sys", "dev"}:
        raise ValueError(f"'{value}' is reserved for the runtime")
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"'{value}' must be an absolute path")
    path = PurePosixPath("/" + value.lstrip("/"))  # POSIX would keep a leading "//"
    if ".." in path.parts:
        raise ValueError(f"'{value}' must not contain '..'")
    return str(path)


def parse_template(data: dict[str, Any], *, source: str) -> Template:
    """Validate parsed TOML data; `source` names the file in errors."""
    try:
        return Template.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        field = ".".join(loc) if loc else None
        top = loc[0] if loc else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field '{loc[-1]}'"
            hint = "remove it or fix its spelling; known fields: " + ", ".join(
                Template.model_fields
            )
        elif error["type"] == "missing":
            message = "is required"
            hint = _HINTS.get(top, f"add '{field}'")
        else:
            hint = _HINTS.get(top, "see the Templates section of the README")
        raise TemplateError(message, file=source, field=field, hint=hint) from None


def load_template(name_or_path: str | Path) -> Template:
    """A built-in template by name, or a template file by path.

    Raises NotFoundError for an unknown name and TemplateError for a bad file.
    """
    text: str
    source = str(name_or_path)
    if (
        isinstance(name_or_path, str)
        and "/" not in name_or_path
        and not name_or_path.endswith(".toml")
    ):
        if name_or_path not in BUILTIN_TEMPLATES:
            raise NotFoundError(
                f"unknown template '{name_or_path}'",
                hint="use a built-in template ("
                + ", ".join(BUILTIN_TEMPLATES)
                + ") or the path of a .toml file",
            )
        return _builtin(name_or_path)
    path = Path(name_or_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(
            f"template file '{path}' does not exist",
            hint="check the path, or use a built-in template: " + ", ".join(BUILTIN_TEMPLATES),
        ) from None
    except OSError as exc:
        raise TemplateError(
            f"cannot be read: {exc.strerror}", file=source, hint="fix its permissions"
        ) from None
    return _parse_text(text, source)


@functools.cache
def _builtin(name: str) -> Template:
    """A built-in template, parsed once per process (templates are immutable)."""
    text = (resources.files("corral.spec") / "builtin" / f"{name}.toml").read_text()
    return _parse_text(text, f"<builtin>/{name}.toml")


def _parse_text(text: str, source: str) -> Template:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(
            f"is not valid TOML ({exc})", file=source, hint="fix the TOML syntax at that line"
        ) from None
    return parse_template(data, source=source)


def list_builtin_templates() -> list[Template]:
    return [load_template(name) for name in BUILTIN_TEMPLATES]
