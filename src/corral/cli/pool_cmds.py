"""`corral pool add|ls|rm`: warm pools of ready sandboxes, here or on a server."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from corral.cli._common import STATE, parse_env, parse_labels, print_json, run_async

if TYPE_CHECKING:
    from corral.api.models import PoolInfo

app = typer.Typer(
    help="Warm pools: sandboxes kept running, handed out by `create/run --from-pool`.",
    no_args_is_help=True,
)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the pool, e.g. py.")],
    size: Annotated[int, typer.Option("--size", "-n", help="Members to keep ready.")],
    template: Annotated[
        str, typer.Option("--template", "-t", help="Built-in name or .toml path.")
    ] = "default",
    max_idle: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Seconds before an idle member is replaced by a fresh one."),
    ] = None,
    snapshot: Annotated[
        bool, typer.Option(help="Members wait snapshotted (no memory held); a claim restores one.")
    ] = False,
    memory: Annotated[Optional[str], typer.Option(help="Memory limit, e.g. 512M.")] = None,  # noqa: UP045
    cpus: Annotated[Optional[float], typer.Option(help="vCPUs, e.g. 0.5.")] = None,  # noqa: UP045
    pids: Annotated[Optional[int], typer.Option(help="Maximum processes.")] = None,  # noqa: UP045
    disk: Annotated[Optional[str], typer.Option(help="Scratch size, e.g. 256M.")] = None,  # noqa: UP045
    env: Annotated[Optional[list[str]], typer.Option("--env", "-e", help="NAME=VALUE.")] = None,  # noqa: UP045
    label: Annotated[Optional[list[str]], typer.Option("--label", "-l", help="KEY=VALUE.")] = None,  # noqa: UP045
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Add a pool (locally its members are started now; a server starts them itself)."""

    async def go() -> PoolInfo:
        target = STATE.target()
        try:
            return await target.add_pool(
                name,
                template,
                size,
                max_idle=max_idle,
                snapshot=snapshot,
                memory=memory,
                cpus=cpus,
                pids=pids,
                disk=disk,
                env=parse_env(env),
                labels=parse_labels(label),
            )
        finally:
            await target.aclose()

    info = run_async(go())
    if json_out:
        print_json(info.model_dump(mode="json"))
    else:
        sys.stdout.write(info.name + "\n")


@app.command("ls")
def ls(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List pools: target size, members ready and starting."""

    async def go() -> list[PoolInfo]:
        target = STATE.target()
        try:
            return await target.list_pools()
        finally:
            await target.aclose()

    pools = run_async(go())
    if json_out:
        print_json([p.model_dump(mode="json") for p in pools])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "TEMPLATE", "RUNTIME", "SIZE", "READY", "STARTING", "MAX IDLE", "ERROR")
    for p in pools:
        table.add_row(
            p.name,
            p.template,
            p.runtime or "-",
            str(p.size),
            str(p.idle),
            str(p.starting),
            "-" if p.max_idle is None else f"{p.max_idle:g}s",
            p.error or "",
        )
    Console().print(table)


@app.command("rm")
def rm(names: Annotated[list[str], typer.Argument(help="Pool names.")]) -> None:
    """Remove pools and destroy their idle members (claimed sandboxes stay)."""

    async def go() -> None:
        target = STATE.target()
        try:
            for name in names:
                await target.remove_pool(name)
                sys.stdout.write(name + "\n")
        finally:
            await target.aclose()

    run_async(go())
