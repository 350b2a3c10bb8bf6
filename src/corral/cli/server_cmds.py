"""`corral serve`, `corral tenants ...` and `corral keys ...` (operators, on the server host)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from corral.cli._common import STATE, fail, print_json
from corral.errors import CorralError, UserError

if TYPE_CHECKING:
    from corral.store import Tenants

tenants_app = typer.Typer(help="Tenants and their quotas.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys (shown once when created; stored hashed).", no_args_is_help=True
)

OptStr = Optional[str]  # noqa: UP045 - typer reads these annotations at run time
OptInt = Optional[int]  # noqa: UP045
OptFloat = Optional[float]  # noqa: UP045
DbOpt = Annotated[
    OptStr,
    typer.Option(
        "--db",
        envvar="CORRAL_DATABASE_URL",
        help="Database URL (default: SQLite in the state dir).",
    ),
]


def serve(
    listen: Annotated[OptStr, typer.Option(help="HOST:PORT (instead of --host/--port).")] = None,
    host: Annotated[OptStr, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[OptInt, typer.Option(help="Port (default 7070).")] = None,
    db: DbOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Serve the HTTP API: reconcile with the backend, then reap expired sandboxes while up."""
    from corral.server.serve import serve as run_server

    if listen is not None:
        host, _, port_text = listen.rpartition(":")
        if not host or not port_text.isdigit():
            fail(UserError(f"--listen '{listen}' is not HOST:PORT", hint="e.g. 127.0.0.1:7070"))
        port = int(port_text)
    try:
        settings = STATE.settings(database_url=db)
        server = settings.server.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        run_server(settings.model_copy(update={"server": server}), log_level=log_level)
    except CorralError as error:
        fail(error)


def _tenants(db: str | None) -> Tenants:
    return STATE.store(STATE.settings(database_url=db)).tenants


@tenants_app.command("add")
def tenants_add(
    name: Annotated[str, typer.Argument()],
    max_sandboxes: Annotated[OptInt, typer.Option(help="Live sandboxes at most.")] = None,
    max_vcpus: Annotated[OptFloat, typer.Option(help="vCPUs over live sandboxes.")] = None,
    max_memory: Annotated[OptStr, typer.Option(help="Memory over live sandboxes, e.g. 8G.")] = None,
    db: DbOpt = None,
) -> None:
    """Add a tenant (optionally with quotas)."""
    from corral.spec.units import parse_size
    from corral.store import Quota

    try:
        memory = parse_size(max_memory) if max_memory is not None else None
        _tenants(db).add(name, Quota(max_sandboxes, max_vcpus, memory))
    except CorralError as error:
        fail(error)
    sys.stdout.write(name + "\n")


@tenants_app.command("ls")
def tenants_ls(db: DbOpt = None, json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List tenants with their quotas and what their live sandboxes hold."""
    try:
        tenants = _tenants(db)
        rows: list[dict[str, Any]] = [
            {
                "name": t.name,
                "quota": asdict(t.quota),
                "usage": asdict(tenants.store.usage(t.name)),
            }
            for t in tenants.list()
        ]
    except CorralError as error:
        fail(error)
    if json_out:
        print_json(rows)
        return
    for row in rows:
        quota, usage = row["quota"], row["usage"]
        sys.stdout.write(
            f"{row['name']}: {usage['sandboxes']}/{quota['max_sandboxes'] or '-'} sandboxes,"
            f" {usage['vcpus']:g}/{quota['max_vcpus'] or '-'} vCPUs,"
            f" {usage['memory'] >> 20}/{(quota['max_memory'] or 0) >> 20 or '-'} MiB\n"
        )


@tenants_app.command("quota")
def tenants_quota(
    name: Annotated[str, typer.Argument()],
    max_sandboxes: Annotated[OptInt, typer.Option()] = None,
    max_vcpus: Annotated[OptFloat, typer.Option()] = None,
    max_memory: Annotated[OptStr, typer.Option(help="e.g. 8G")] = None,
    db: DbOpt = None,
) -> None:
    """Set a tenant's quotas (an option left out means no limit)."""
    from corral.spec.units import parse_size
    from corral.store import Quota

    try:
        memory = parse_size(max_memory) if max_memory is not None else None
        _tenants(db).set_quota(name, Quota(max_sandboxes, max_vcpus, memory))
    except CorralError as error:
        fail(error)


@tenants_app.command("rm")
def tenants_rm(name: Annotated[str, typer.Argument()], db: DbOpt = None) -> None:
    """Remove a tenant and its keys (refused while it owns sandboxes)."""
    try:
        _tenants(db).remove(name)
    except CorralError as error:
        fail(error)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument()],
    admin: Annotated[bool, typer.Option(help="Fleet-wide views (every tenant).")] = False,
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
    db: DbOpt = None,
) -> None:
    """Create an API key for TENANT and print it (it is not shown again)."""
    try:
        key = _tenants(db).create_key(tenant, admin=admin, description=description)
    except CorralError as error:
        fail(error)
    sys.stdout.write(key + "\n")


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[OptStr, typer.Option()] = None,
    db: DbOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List keys (ids and facts; secrets are never stored)."""
    try:
        keys = [asdict(k) for k in _tenants(db).list_keys(tenant)]
    except CorralError as error:
        fail(error)
    if json_out:
        print_json(keys)
        return
    for k in keys:
        state = "revoked" if k["revoked_at"] else ("admin" if k["admin"] else "active")
        sys.stdout.write(f"{k['id']}  {k['tenant']}  {state}  {k['description']}\n")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()], db: DbOpt = None) -> None:
    """Revoke a key by its id (`corral keys ls`); it stops working at once."""
    try:
        _tenants(db).revoke_key(key_id)
    except CorralError as error:
        fail(error)
