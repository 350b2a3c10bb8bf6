"""`corral context add|use|ls|rm|show`: which Corral the sandbox commands talk to."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from corral.cli._common import STATE, fail, print_json
from corral.errors import CorralError

app = typer.Typer(
    help="Contexts: a remote Corral server (URL + API key) or 'local' (this host).",
    no_args_is_help=True,
)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the server, e.g. prod.")],
    url: Annotated[str, typer.Argument(help="The server's URL, e.g. https://host:7070.")],
    token: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--token", help="API key (else $CORRAL_API_KEY when used)."),
    ] = None,
    use: Annotated[bool, typer.Option("--use", help="Make it the current context.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a context.")] = False,
) -> None:
    """Add a context for a Corral server."""
    from corral.cli.contexts import ContextStore

    try:
        store = ContextStore()
        store.add(name, url, token, replace=replace)
        if use:
            store.use(name)
    except CorralError as error:
        fail(error)
    sys.stdout.write(name + "\n")


@app.command("use")
def use(name: Annotated[str, typer.Argument(help="A context name, or 'local'.")]) -> None:
    """Make NAME the context commands use (overridden by --context / $CORRAL_CONTEXT)."""
    from corral.cli.contexts import ContextStore

    try:
        ContextStore().use(name)
    except CorralError as error:
        fail(error)


@app.command("ls")
def ls(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List contexts; '*' marks the one in use."""
    from corral.cli.contexts import ContextStore

    try:
        store = ContextStore()
        _current, contexts = store.list()
        active = store.resolve(STATE.context).name
    except CorralError as error:
        fail(error)
    rows = [
        {
            "name": c.name,
            "url": c.url or "(this host)",
            "token": "set" if c.token else "-",
            "current": c.name == active,
        }
        for c in contexts
    ]
    if json_out:
        print_json(rows)
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        sys.stdout.write(f"{mark} {row['name']}  {row['url']}  token: {row['token']}\n")


@app.command("rm")
def rm(name: Annotated[str, typer.Argument()]) -> None:
    """Remove a context (the current one falls back to 'local')."""
    from corral.cli.contexts import ContextStore

    try:
        ContextStore().remove(name)
    except CorralError as error:
        fail(error)
