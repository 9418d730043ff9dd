"""``pygirder cloud image build | list | delete``: the template image instances boot from.

The cloud CLI mounts :data:`app` as ``pygirder cloud image``; the work is done by
:mod:`pygirder.cloud.image`, imported inside the commands so the CLI loads without
boto3.  Progress goes to stderr, tables and ``--json`` to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ...errors import ConfigError, PygirderError

__all__ = ["app"]

app = typer.Typer(
    help="Bake, list and delete the template image (AMI) that pygirder instances boot from.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="pygirder.toml (default: $PYGIRDER_CONFIG, ./pygirder.toml)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _fail(exc: PygirderError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _progress(text: str) -> None:
    err.print(f"[dim]{escape(text)}[/]")


def _config(path: Path | None):  # -> CloudConfig
    from ..config import load_config

    try:
        return load_config(path)
    except PygirderError as exc:
        raise _fail(exc) from None


@app.command()
def build(
    config: ConfigOpt = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="x86_64 (default) or arm64 (Graviton: the redis node's default type).",
        ),
    ] = None,
    instance_type: Annotated[
        str | None,
        typer.Option(
            "--instance-type",
            help="Builder type (default t3.small, or t4g.small for arm64); its "
            "architecture is the image's.",
        ),
    ] = None,
    python: Annotated[
        str, typer.Option("--python", help="Amazon Linux Python package to install.")
    ] = "python3.11",
    keep_builder: Annotated[
        bool,
        typer.Option(
            "--keep-builder",
            help="Keep the builder (stopped, termination-protected; running if the bake failed).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Minutes to wait for the bake.")
    ] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Bake a new template image from the latest Amazon Linux 2023 (takes a few minutes)."""
    from ..image import build_image

    cfg = _config(config)
    try:
        result = build_image(
            cfg, architecture=arch, instance_type=instance_type, python_package=python,
            keep_builder=keep_builder, bake_timeout=timeout * 60,
            progress=None if as_json else _progress,
        )  # fmt: skip
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    err.print(
        f"[green]built[/] [bold]{escape(result.image_id)}[/] ({escape(result.name)}, "
        f"{escape(result.architecture)}, IMDSv2 required) in {result.seconds / 60:.1f} min"
    )


@app.command("list")
def list_(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List this setup's template images, newest first (and builders that still exist)."""
    from ..image import list_builders, list_images

    cfg = _config(config)
    try:
        images, builders = list_images(cfg), list_builders(cfg)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps({"images": images, "builders": builders}, indent=2))
        return
    table = Table(title=f"pygirder images of {cfg.name!r} in {cfg.region}", title_justify="left")
    for header in ("Image", "Name", "State", "Arch", "Created", "IMDS", "Snapshots"):
        table.add_column(header, no_wrap=True)
    for row in images:
        table.add_row(
            escape(row["image_id"]), escape(row["name"]), escape(row["state"]),
            escape(row["architecture"]), escape(row["created"][:19]),
            escape(row["imds_support"] or "-"), escape(", ".join(row["snapshot_ids"])),
        )  # fmt: skip
    out.print(table)
    if not images:
        err.print("no images yet: `pygirder cloud image build` bakes one")
    for builder in builders:
        err.print(
            f"[yellow]builder[/] {escape(builder['instance_id'])} is {escape(builder['state'])}:"
            f" `pygirder cloud image delete {escape(builder['instance_id'])}` removes it"
        )


@app.command()
def delete(
    ids: Annotated[
        list[str] | None,
        typer.Argument(help="Image ids (ami-...) and kept builders (i-...)."),
    ] = None,
    config: ConfigOpt = None,
    all_images: Annotated[
        bool, typer.Option("--all", help="Every image and builder of this setup.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Deregister images and delete their snapshots; terminate kept builders."""
    from ..image import delete_images, list_builders, list_images

    cfg = _config(config)
    targets = list(ids or [])
    try:
        if all_images:
            targets += [row["image_id"] for row in list_images(cfg)]
            targets += [row["instance_id"] for row in list_builders(cfg)]
        if not targets:
            raise ConfigError("name the images (ami-...) or builders (i-...) to delete, or --all")
        if not yes:
            if not sys.stdin.isatty():
                raise ConfigError("deleting images: confirm with --yes when not at a terminal")
            typer.confirm(f"Delete {', '.join(targets)}?", abort=True)
        done = delete_images(cfg, targets, progress=None if as_json else _progress)
    except PygirderError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps({"deleted": done}, indent=2))
