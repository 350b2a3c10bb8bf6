"""`corral images build|ls|rm`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli._common import STATE, fail, print_json
from corral.errors import CorralError

if TYPE_CHECKING:
    from corral.images import ImageStore

app = typer.Typer(help="Build and manage images realized from templates.", no_args_is_help=True)


def _store() -> ImageStore:
    from corral.images import ImageStore

    return ImageStore(STATE.settings().state_dir / "images")


@app.command()
def build(
    template: Annotated[str, typer.Argument(help="Built-in name or .toml path.")] = "default",
    force: Annotated[bool, typer.Option(help="Rebuild even when cached.")] = False,
    builder: Annotated[
        str, typer.Option(help="default (the template's base) or nix (the flake's output).")
    ] = "default",
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Realize TEMPLATE into a rootfs and an OCI image layout (cached by content)."""
    from corral.spec.template import load_template

    try:
        image = _store().build(
            load_template(template), force=force, progress=not json_out, builder=builder
        )
    except CorralError as error:
        fail(error)
    if json_out:
        print_json(_image_json(image))
    else:
        sys.stdout.write(f"{image.digest}  {image.template}  {image.layout}\n")


@app.command("ls")
def ls(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List built images."""
    images = _store().list()
    if json_out:
        print_json([_image_json(i) for i in images])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("DIGEST", "TEMPLATE", "BASE", "SIZE", "CREATED")
    for image in images:
        table.add_row(image.digest[:19], image.template, image.base, str(image.size), image.created)
    Console().print(table)


@app.command()
def rm(ref: Annotated[str, typer.Argument(help="Digest (prefix) or template name.")]) -> None:
    """Remove an image from the store."""
    try:
        _store().remove(ref)
    except CorralError as error:
        fail(error)


def _image_json(image: object) -> dict[str, object]:
    fields = ("digest", "key", "template", "base", "rootfs", "layout", "size", "created")
    return {name: str(getattr(image, name)) for name in fields}
