"""What every CLI command shares: settings, the manager, error reporting, JSON output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from corral.config import Settings
from corral.errors import CorralError, UserError

if TYPE_CHECKING:
    from corral.api.models import Sandbox
    from corral.cli.targets import Target
    from corral.runtime.manager import SandboxManager
    from corral.store import Store

T = TypeVar("T")


@dataclass
class CliState:
    state_dir: str | None = None
    backend: str | None = None
    runtime: str | None = None
    context: str | None = None
    vmm: str | None = None

    def settings(self, **overrides: Any) -> Settings:
        return Settings.load(
            state_dir=self.state_dir,
            backend=self.backend,
            runtime=self.runtime,
            vmm=self.vmm,
            **overrides,
        )

    def manager(self) -> SandboxManager:
        from corral.runtime.manager import SandboxManager

        settings = self.settings()
        return SandboxManager.from_settings(settings, self.store(settings))

    def target(self) -> Target:
        """Where sandbox commands act: the context's server, or this host in-process."""
        from corral.cli.contexts import ContextStore
        from corral.cli.targets import LocalTarget, RemoteTarget

        context = ContextStore().resolve(self.context)
        if context.url is None:
            return LocalTarget(self.manager(), self.runtime)
        from corral.client import AsyncCorral

        return RemoteTarget(context.name, AsyncCorral(context.url, context.token), self.runtime)

    def store(self, settings: Settings | None = None) -> Store:
        from corral.store import Store

        settings = settings or self.settings()
        key = settings.database_url or str(settings.state_dir)
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = Store.open(settings.database_url, settings.state_dir)
        return store


STATE = CliState()
# Stores opened in this process, by state dir. The command server opens its store
# before forking (engine built, migrations checked, pool emptied), so each forked
# command starts with it ready and opens only its own connection.
_STORES: dict[str, Store] = {}


def fail(error: CorralError, *, code: int = 1) -> NoReturn:
    kind = "error" if isinstance(error, UserError) else "host error"
    sys.stderr.write(f"corral: {kind}: {error}\n")
    raise typer.Exit(code)


def run_async(coro: Coroutine[Any, Any, T], *, error_code: int = 1) -> T:
    """Run `coro`; Corral errors become a message on stderr and exit `error_code`."""
    from corral._sys.procs import use_pidfd_child_watcher

    use_pidfd_child_watcher()
    try:
        return asyncio.run(coro)
    except CorralError as error:
        fail(error, code=error_code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _parse_pairs(pairs: list[str] | None, option: str, form: str, example: str) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{option} '{pair}' is not {form}", hint=f"e.g. {option} {example}")
        parsed[key] = value
    return parsed


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    return _parse_pairs(pairs, "--env", "NAME=VALUE", "RUST_LOG=debug")


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    return _parse_pairs(pairs, "--label", "KEY=VALUE", "team=infra")


def say_ports(sandbox: Sandbox) -> None:
    """Where the sandbox's published ports are, on stderr (stdout stays the id/output)."""
    for port in sandbox.ports:
        host = f"[{port.host_ip}]" if ":" in port.host_ip else port.host_ip
        sys.stderr.write(f"corral: {host}:{port.host_port} -> port {port.container_port}\n")
