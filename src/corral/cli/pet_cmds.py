"""Pets from the CLI: `corral service deploy`, `corral promote`, `corral logs`,
`corral volume rm` - on this host in-process, or on a server through the SDK."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from corral.cli._common import STATE, parse_env, parse_labels, print_json, run_async, say_ports
from corral.cli.targets import LocalTarget, RemoteTarget

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from corral.api.models import Sandbox
    from corral.cli.targets import Target

service_app = typer.Typer(
    help="Services: a template's [service] run as a pet.", no_args_is_help=True
)
volume_app = typer.Typer(help="Pets' persistent volumes.", no_args_is_help=True)

NameOpt = Annotated[str, typer.Option("--name", "-n", help="The pet's name (unique, stable).")]
VolumeOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Volume size, e.g. 1G (default: the template's [volume], or 256M)."),
]
RestartOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Restart policy: always or on-failure (default: the template's)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


async def create_pet(target: Target, template: str, **options: Any) -> Sandbox:
    from corral.api.models import Sandbox

    fields = {k: v for k, v in options.items() if v is not None}
    if isinstance(target, LocalTarget):
        if target.runtime is not None:
            fields["runtime"] = target.runtime
        record = await target.manager.pets.create(template, progress=True, **fields)
        if record.spec["pet"].get("service") is not None:
            sys.stderr.write(
                "note: the service starts when `corral serve` runs on this host"
                " (its supervisor runs pets' services)\n"
            )
        return Sandbox.from_record(record)
    assert isinstance(target, RemoteTarget)
    if target.runtime is not None:
        fields["runtime"] = target.runtime
    ref: str | Path = Path(template) if template.endswith(".toml") or "/" in template else template
    return (await target.client.create_pet(ref, **fields)).info


async def promote_sandbox(target: Target, sandbox: str, **options: Any) -> Sandbox:
    from corral.api.models import Sandbox

    if isinstance(target, LocalTarget):
        return Sandbox.from_record(await target.manager.pets.promote(sandbox, **options))
    assert isinstance(target, RemoteTarget)
    remote = await target.client.get(sandbox)
    name = options.pop("name")
    return await remote.promote(name, **options)


def read_logs(
    target: Target, sandbox: str, *, follow: bool, tail: int | None
) -> AsyncIterator[bytes]:
    if isinstance(target, LocalTarget):
        pets = target.manager.pets
        return pets.read_logs(pets.logs_of(sandbox), follow=follow, tail=tail)
    assert isinstance(target, RemoteTarget)
    return _remote_logs(target, sandbox, follow=follow, tail=tail)


async def _remote_logs(
    target: RemoteTarget, sandbox: str, *, follow: bool, tail: int | None
) -> AsyncIterator[bytes]:
    remote = await target.client.get(sandbox)
    async for chunk in remote.logs(follow=follow, tail=tail):
        yield chunk


@service_app.command("deploy")
def deploy(
    template: Annotated[str, typer.Argument(help="A .toml path (or name) with a service.")],
    name: NameOpt,
    volume: VolumeOpt = None,
    restart: RestartOpt = None,
    memory: Annotated[Optional[str], typer.Option(help="Memory, e.g. 512M.")] = None,  # noqa: UP045
    cpus: Annotated[Optional[float], typer.Option(help="vCPUs (whole CPUs are pinned).")] = None,  # noqa: UP045
    cpuset: Annotated[Optional[str], typer.Option(help="These CPUs, e.g. 2-3.")] = None,  # noqa: UP045
    env: Annotated[Optional[list[str]], typer.Option("--env", "-e", help="NAME=VALUE.")] = None,  # noqa: UP045
    label: Annotated[Optional[list[str]], typer.Option("--label", "-l", help="KEY=VALUE.")] = None,  # noqa: UP045
    publish: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--publish", "-p", help="[[IP:]HOST:]CONTAINER (default: its service's)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Start TEMPLATE's service as a pet named NAME; prints its id.

    `corral serve` supervises it: restarts, health checks, logs."""

    async def go() -> Sandbox:
        target = STATE.target()
        try:
            return await create_pet(
                target,
                template,
                name=name,
                volume=volume,
                restart=restart,
                memory=memory,
                cpus=cpus,
                cpuset=cpuset,
                env=parse_env(env),
                labels=parse_labels(label),
                ports=publish or (),
            )
        finally:
            await target.aclose()

    _print(run_async(go()), json_out)


def promote(
    sandbox: Annotated[str, typer.Argument(help="The running sandbox (id or name).")],
    name: NameOpt,
    volume: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Give it a volume of this size (re-creates it; files carried over)."),
    ] = None,
    restart: RestartOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Turn a running sandbox into a pet (kept running, named, pinned, restarted).

    Without --volume its processes keep running; with it, it is re-created with
    the volume, its workdir and home carried over."""

    async def go() -> Sandbox:
        target = STATE.target()
        try:
            return await promote_sandbox(target, sandbox, name=name, volume=volume, restart=restart)
        finally:
            await target.aclose()

    _print(run_async(go()), json_out)


def restart(
    sandbox: Annotated[str, typer.Argument(help="The failed pet (name or id).")],
    json_out: JsonOpt = False,
) -> None:
    """Supervise a failed pet again, once what made it crash-loop is fixed."""

    async def go() -> Sandbox:
        from corral.api.models import Sandbox

        target = STATE.target()
        try:
            if isinstance(target, LocalTarget):
                return Sandbox.from_record(target.manager.pets.restart(sandbox))
            assert isinstance(target, RemoteTarget)
            return await (await target.client.get(sandbox)).restart()
        finally:
            await target.aclose()

    _print(run_async(go()), json_out)


def logs(
    sandbox: Annotated[str, typer.Argument(help="The pet (name or id).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    tail: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Only the last this many bytes."),
    ] = None,
) -> None:
    """Print a pet's log: its service's output and the supervisor's lines."""

    async def go() -> None:
        target = STATE.target()
        try:
            async for chunk in read_logs(target, sandbox, follow=follow, tail=tail):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        finally:
            await target.aclose()

    run_async(go())


@volume_app.command("rm")
def volume_rm(name: Annotated[str, typer.Argument(help="The destroyed pet's name.")]) -> None:
    """Delete a kept volume and its data (refused while a pet of that name exists)."""

    async def go() -> None:
        target = STATE.target()
        try:
            if isinstance(target, LocalTarget):
                target.manager.pets.remove_volume(name, tenant="local")
            else:
                assert isinstance(target, RemoteTarget)
                await target.client.remove_volume(name)
        finally:
            await target.aclose()

    run_async(go())


def _print(sandbox: Sandbox, json_out: bool) -> None:
    if json_out:
        print_json(sandbox.model_dump(mode="json"))
    else:
        say_ports(sandbox)
        sys.stdout.write(sandbox.id + "\n")
