"""`corral`: run, create and drive sandboxes; build images; check and prepare the host."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer
import typer.main

from corral.cli import context_cmds, host_cmds, images_cmds, pet_cmds, pool_cmds, server_cmds
from corral.cli._common import (
    STATE,
    fail,
    parse_env,
    parse_labels,
    print_json,
    run_async,
    say_ports,
)
from corral.errors import UserError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from typer._click.core import Command as ClickCommand

    from corral.api.models import Sandbox
    from corral.backends.base import ExecEvent
    from corral.cli.targets import Target

app = typer.Typer(
    name="corral",
    help="Sandboxes for untrusted code: OCI runtimes, gVisor and microVMs from one template.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(images_cmds.app, name="images")
app.add_typer(host_cmds.app, name="host")
app.command("doctor")(host_cmds.doctor)
app.command("serve")(server_cmds.serve)
app.add_typer(server_cmds.tenants_app, name="tenants")
app.add_typer(server_cmds.keys_app, name="keys")
app.add_typer(context_cmds.app, name="context")
app.add_typer(pool_cmds.app, name="pool")
app.add_typer(pet_cmds.service_app, name="service")
app.add_typer(pet_cmds.volume_app, name="volume")
app.command("promote")(pet_cmds.promote)
app.command("logs")(pet_cmds.logs)
app.command("restart")(pet_cmds.restart)

CORRAL_FAILED = 125  # `run`/`exec`: Corral itself failed (the command's codes pass through)

TemplateOpt = Annotated[str, typer.Option("--template", "-t", help="Built-in name or .toml path.")]
MemoryOpt = Annotated[Optional[str], typer.Option(help="Memory limit, e.g. 512M.")]  # noqa: UP045
CpusOpt = Annotated[Optional[float], typer.Option(help="vCPUs (CPU quota), e.g. 0.5.")]  # noqa: UP045
PidsOpt = Annotated[Optional[int], typer.Option(help="Maximum number of processes.")]  # noqa: UP045
DiskOpt = Annotated[Optional[str], typer.Option(help="Scratch size, e.g. 256M.")]  # noqa: UP045
EnvOpt = Annotated[Optional[list[str]], typer.Option("--env", "-e", help="NAME=VALUE.")]  # noqa: UP045
LabelOpt = Annotated[Optional[list[str]], typer.Option("--label", "-l", help="KEY=VALUE.")]  # noqa: UP045
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
PublishOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--publish", "-p", help="Publish a TCP port: [[IP:]HOST:]CONTAINER (HOST 0: any free)."
    ),
]
FromPoolOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--from-pool", help="Claim a ready sandbox from this warm pool."),
]


@app.callback()
def _global(
    state_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="CORRAL_STATE_DIR", help="State directory (default /var/lib/corral)."),
    ] = None,
    backend: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="CORRAL_BACKEND", help="Backend override (oci, fake, ...)."),
    ] = None,
    runtime: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="CORRAL_RUNTIME", help="OCI runtime: crun, runc or runsc."),
    ] = None,
    context: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="CORRAL_CONTEXT", help="Context: a server, or 'local'."),
    ] = None,
    vmm: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            envvar="CORRAL_VMM",
            help="The microvm backend's VMM: qemu, firecracker or cloud-hypervisor.",
        ),
    ] = None,
) -> None:
    STATE.state_dir, STATE.backend, STATE.runtime = state_dir, backend, runtime
    STATE.context, STATE.vmm = context, vmm


async def _stream(events: AsyncIterator[ExecEvent]) -> int:
    """Copy output to this process's stdout/stderr as it comes; the command's exit code."""
    import contextlib

    from corral.backends.base import Output

    generator = cast("AsyncGenerator[ExecEvent]", events)
    async with contextlib.aclosing(generator):
        async for event in generator:
            if isinstance(event, Output):
                target = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
                target.write(event.data)
                target.flush()
            else:
                if event.reason:
                    sys.stderr.write(f"corral: {event.reason}\n")
                return event.exit_code
    return CORRAL_FAILED


def _split_put(spec: str) -> tuple[Path, str]:
    local, sep, remote = spec.rpartition(":")
    if not sep or not local or not remote.startswith("/"):
        raise UserError(
            f"--put '{spec}' is not LOCAL:/sandbox/path", hint="e.g. --put main.rs:/work/main.rs"
        )
    return Path(local), remote


def _read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror}", hint="check the path") from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    template: TemplateOpt = "default",
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
    pids: PidsOpt = None,
    disk: DiskOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds before the command is killed (exit 124).")
    ] = None,
    env: EnvOpt = None,
    workdir: Annotated[Optional[str], typer.Option(help="Working directory inside.")] = None,  # noqa: UP045
    put: Annotated[
        list[str] | None, typer.Option(help="Copy LOCAL:/path in before running.")
    ] = None,
    label: LabelOpt = None,
    publish: PublishOpt = None,
    from_pool: FromPoolOpt = None,
) -> None:
    """Run COMMAND in a fresh sandbox, stream its output, destroy it, exit with its status."""

    async def go() -> int:
        env_map, labels = parse_env(env), parse_labels(label)
        files = [(remote, _read_local(local)) for local, remote in map(_split_put, put or [])]
        from corral.cli.targets import RemoteTarget

        target = STATE.target()
        try:
            if isinstance(target, RemoteTarget) and not (files or publish or from_pool):
                # One request: nothing to say or copy between create and exec.
                one_request = target.run_stream(
                    template, command, env=env_map, cwd=workdir, timeout=timeout,
                    memory=memory, cpus=cpus, pids=pids, disk=disk, labels=labels,
                )  # fmt: skip
                return await _stream(one_request)
            if from_pool is not None:
                _pool_fixes(memory=memory, cpus=cpus, pids=pids, disk=disk, publish=publish)
                sandbox = await _claim(target, from_pool, timeout=timeout, labels=labels)
            else:
                sandbox = await target.create(
                    template,
                    memory=memory,
                    cpus=cpus,
                    pids=pids,
                    disk=disk,
                    timeout=timeout,
                    labels=labels,
                    ports=publish or (),
                )
                say_ports(sandbox)
            try:
                for remote, data in files:
                    await target.put_file(sandbox.id, remote, data)
                events = target.exec_stream(
                    sandbox.id, command, env=env_map, cwd=workdir, stdin=None, timeout=timeout
                )
                return await _stream(events)
            finally:
                await target.destroy(sandbox.id)
        finally:
            await target.aclose()

    raise typer.Exit(run_async(go(), error_code=CORRAL_FAILED))


@app.command()
def create(
    template: TemplateOpt = "default",
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
    pids: PidsOpt = None,
    disk: DiskOpt = None,
    cpuset: Annotated[Optional[str], typer.Option(help="Pin to CPUs, e.g. 0-1.")] = None,  # noqa: UP045
    timeout: Annotated[Optional[float], typer.Option(help="Seconds until reaped.")] = None,  # noqa: UP045
    env: EnvOpt = None,
    label: LabelOpt = None,
    name: Annotated[Optional[str], typer.Option(help="A name to use instead of the id.")] = None,  # noqa: UP045
    publish: PublishOpt = None,
    json_out: JsonOpt = False,
    from_pool: FromPoolOpt = None,
) -> None:
    """Create a sandbox that stays up; prints its id (published ports on stderr)."""

    async def go() -> Sandbox:
        target = STATE.target()
        try:
            if from_pool is not None:
                _pool_fixes(
                    memory=memory, cpus=cpus, pids=pids, disk=disk, cpuset=cpuset, env=env,
                    publish=publish,
                )  # fmt: skip
                return await _claim(
                    target, from_pool, timeout=timeout, labels=parse_labels(label), name=name
                )
            return await target.create(
                template,
                memory=memory,
                cpus=cpus,
                pids=pids,
                disk=disk,
                cpuset=cpuset,
                timeout=timeout,
                env=parse_env(env),
                labels=parse_labels(label),
                name=name,
                progress=True,
                ports=publish or (),
            )
        finally:
            await target.aclose()

    sandbox = run_async(go())
    if json_out:
        print_json(sandbox.model_dump(mode="json"))
    else:
        say_ports(sandbox)
        sys.stdout.write(sandbox.id + "\n")


def _pool_fixes(**options: object) -> None:
    given = sorted(f"--{k}" for k, v in options.items() if v)
    if given:
        raise UserError(
            f"{', '.join(given)}: a pool fixes these for its sandboxes",
            hint="set them on the pool (`corral pool add`), or leave out --from-pool",
        )


async def _claim(target: Target, pool: str, **options: object) -> Sandbox:
    result = await target.claim(pool, **options)
    if not result.from_pool:
        sys.stderr.write(f"corral: pool '{pool}' had no ready sandbox; created one cold\n")
    return result.sandbox


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    sandbox: Annotated[str, typer.Argument(help="Sandbox id or name.")],
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    env: EnvOpt = None,
    workdir: Annotated[Optional[str], typer.Option(help="Working directory inside.")] = None,  # noqa: UP045
    timeout: Annotated[
        float | None, typer.Option(help="Seconds before the command is killed.")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Pass this process's stdin.")
    ] = False,
) -> None:
    """Run COMMAND in a running sandbox, streaming its output; exit with its status."""
    data = sys.stdin.buffer.read() if stdin else None

    async def go() -> int:
        target = STATE.target()
        try:
            events = target.exec_stream(
                sandbox, command, env=parse_env(env), cwd=workdir, stdin=data, timeout=timeout
            )
            return await _stream(events)
        finally:
            await target.aclose()

    raise typer.Exit(run_async(go(), error_code=CORRAL_FAILED))


@app.command()
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL or SANDBOX:/path")],
    dest: Annotated[str, typer.Argument(help="LOCAL or SANDBOX:/path")],
) -> None:
    """Copy a file into (LOCAL SANDBOX:/path) or out of (SANDBOX:/path LOCAL) a sandbox."""
    src_box, _, src_path = source.partition(":") if ":/" in source else ("", "", source)
    dst_box, _, dst_path = dest.partition(":") if ":/" in dest else ("", "", dest)
    if bool(src_box) == bool(dst_box):
        fail(
            UserError(
                "exactly one side of cp must be SANDBOX:/path",
                hint="e.g. corral cp main.rs sb-1234:/work/main.rs",
            )
        )

    async def go() -> None:
        target = STATE.target()
        try:
            if dst_box:
                await target.put_file(dst_box, dst_path, _read_local(Path(src_path)))
            else:
                Path(dst_path).write_bytes(await target.get_file(src_box, src_path))
        finally:
            await target.aclose()

    run_async(go())


@app.command("ls")
def ls(
    json_out: JsonOpt = False,
    label: LabelOpt = None,
    state: Annotated[Optional[str], typer.Option(help="Only sandboxes in this state.")] = None,  # noqa: UP045
) -> None:
    """List sandboxes."""
    try:
        labels = parse_labels(label)
    except UserError as error:
        fail(error)

    async def go() -> list[Sandbox]:
        target = STATE.target()
        try:
            return await target.list(state=state, labels=labels)
        finally:
            await target.aclose()

    records = run_async(go())
    if json_out:
        print_json([r.model_dump(mode="json") for r in records])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("ID", "NAME", "TEMPLATE", "BACKEND", "RUNTIME", "STATE", "EXPIRES")
    import time

    for r in records:
        expires = "-" if r.expires_at is None else f"{max(0, r.expires_at - time.time()):.0f}s"
        table.add_row(
            r.id, r.name or "-", r.template, r.backend, r.runtime or "-", r.state, expires
        )
    Console().print(table)


@app.command()
def inspect(sandbox: Annotated[str, typer.Argument()], json_out: JsonOpt = False) -> None:
    """Show a sandbox's record and, while it runs, its resource use."""

    async def go() -> dict[str, object]:
        target = STATE.target()
        try:
            inspection = await target.inspect(sandbox)
        finally:
            await target.aclose()
        # The record, then what the runtime says now: a sandbox can stop under its
        # record (e.g. a gVisor sentry that hit its pids limit, or a host reboot).
        data: dict[str, object] = inspection.sandbox.model_dump(mode="json")
        data["backend_status"] = inspection.backend_status
        if inspection.stats is not None:
            data["stats"] = inspection.stats.model_dump(mode="json")
        return data

    data = run_async(go())
    if json_out:
        print_json(data)
    else:
        from rich import print_json as rich_json

        rich_json(data=data)


@app.command()
def rm(sandboxes: Annotated[list[str], typer.Argument(help="Sandbox ids or names.")]) -> None:
    """Destroy sandboxes, releasing everything they hold."""

    async def go() -> None:
        target = STATE.target()
        try:
            for sandbox in sandboxes:
                await target.destroy(sandbox)
                sys.stdout.write(sandbox + "\n")
        finally:
            await target.aclose()

    run_async(go())


@app.command()
def gc(json_out: JsonOpt = False) -> None:
    """Reap expired sandboxes and remove what a crash left behind."""

    async def go() -> dict[str, list[str]]:
        target = STATE.target()
        try:
            return await target.gc()
        finally:
            await target.aclose()

    report = run_async(go())
    if json_out:
        print_json(report)
    else:
        for kind, ids in report.items():
            sys.stdout.write(f"{kind}: {', '.join(ids) if ids else '-'}\n")


@functools.cache
def click_command() -> ClickCommand:
    """The click command tree, built once per process (the command server builds it
    before forking; building it costs ~30 ms)."""
    return typer.main.get_command(app)


def main() -> None:
    click_command()(prog_name="corral")
