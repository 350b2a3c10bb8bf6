"""`corral doctor` and `corral host prepare`."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from corral.cli._common import print_json

app = typer.Typer(help="Prepare this host for Corral.", no_args_is_help=True)


def doctor(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Report what this host supports and what is missing, each with its fix."""
    from corral.host.doctor import checks_to_json, format_checks, run_checks

    checks = run_checks()
    if json_out:
        print_json(checks_to_json(checks))
    else:
        from rich.console import Console

        Console().print(format_checks(checks))
    raise typer.Exit(1 if any(c.status == "fail" for c in checks) else 0)


@app.command()
def prepare(
    dry_run: Annotated[bool, typer.Option(help="Only say what would be done.")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Apply the safe host fixes that `corral doctor` names."""
    from corral.host.prepare import prepare_host

    actions = prepare_host(dry_run=dry_run)
    if json_out:
        print_json([asdict(a) for a in actions])
        return
    for action in actions:
        mark = "done" if action.done else "todo"
        sys.stdout.write(f"[{mark}] {action.description}: {action.detail}\n")
