"""Typed settings, read in one place from a TOML file and the environment.

Precedence: explicit arguments > environment (CORRAL_*) > config file
($CORRAL_CONFIG, else /etc/corral/config.toml) > defaults. Tests pass their
own `environ` mapping instead of touching os.environ.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.backends.microvm.settings import MicrovmSettings
from corral.errors import UserError

DEFAULT_CONFIG_FILE = Path("/etc/corral/config.toml")


class OciSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runtime: str = "crun"


class PodmanSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runtime: Literal["crun", "runc", "runsc"] = "crun"


class ServerSettings(BaseModel):
    """`corral serve`: where it listens and how it keeps sandboxes in order."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = Field(default=7070, ge=0, le=65535)
    templates_dir: Path | None = None  # extra *.toml templates offered to tenants
    reap_interval: float = Field(default=1.0, gt=0)
    max_upload_bytes: int = Field(default=64 << 20, ge=1)
    # Commands run at most this long (None: as long as the caller's timeout says).
    max_exec_seconds: float | None = Field(default=None, gt=0)
    # Bases a template sent with a request may use (a debian base runs mmdebstrap).
    allowed_bases: tuple[str, ...] = ("host", "busybox", "debian:bookworm")


class Settings(BaseModel):
    """Corral's configuration; each backend owns its own section."""

    model_config = ConfigDict(extra="forbid")
    state_dir: Path = Path("/var/lib/corral")
    backend: str = "oci"
    default_template: str = "default"
    max_file_bytes: int = Field(default=64 << 20, ge=1)
    # Host addresses sandboxes' ports may be published on; the first is the default.
    # Loopback only unless the operator adds e.g. a private interface's address.
    publish_addresses: tuple[str, ...] = Field(default=("127.0.0.1",), min_length=1)
    # None: SQLite in the state directory; else e.g. postgresql+psycopg://user@/corral
    database_url: str | None = None
    oci: OciSettings = OciSettings()
    podman: PodmanSettings = PodmanSettings()
    microvm: MicrovmSettings = MicrovmSettings()
    server: ServerSettings = ServerSettings()

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        path = Path(env["CORRAL_CONFIG"]) if "CORRAL_CONFIG" in env else DEFAULT_CONFIG_FILE
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise UserError(f"{path}: not valid TOML ({exc})", hint="fix the file") from None
        for key, field in (
            ("CORRAL_STATE_DIR", "state_dir"),
            ("CORRAL_BACKEND", "backend"),
            ("CORRAL_DATABASE_URL", "database_url"),
        ):
            if env.get(key):
                data[field] = env[key]
        runtime = env.get("CORRAL_RUNTIME") or None
        vmm = env.get("CORRAL_VMM") or None
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "runtime":
                runtime = value
            elif key == "vmm":
                vmm = value
            else:
                data[key] = value
        if vmm:
            microvm = data.setdefault("microvm", {})
            if isinstance(microvm, dict):
                microvm["vmm"] = vmm
        if runtime:
            # The runtime belongs to the section of the backend in use (oci by default).
            section = "podman" if data.get("backend") == "podman" else "oci"
            data.setdefault(section, {})["runtime"] = runtime
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise UserError(
                f"configuration: '{where}': {error['msg']}",
                hint=f"fix it in {path} or the CORRAL_* environment variables",
            ) from None
