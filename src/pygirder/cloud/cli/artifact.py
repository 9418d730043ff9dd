"""``pygirder cloud artifact push|list``: build the project into an artifact and keep it on S3.

The cloud CLI mounts :data:`app` as ``pygirder cloud artifact``.  The bucket and
prefix come from ``--bucket``/``--prefix``, else from the account setup
(``pygirder.cloud.account.account_resources(load_config())``), looked up only when
needed so these commands also work against a bucket given by hand.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from ...errors import PygirderError
from ..artifacts import build_artifact, list_artifacts, push_artifact

__all__ = ["app", "artifact_list", "artifact_push"]

app = typer.Typer(
    help="Build the project and pygirder into an artifact on S3, where instances fetch it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BucketOpt = Annotated[
    str | None,
    typer.Option(
        "--bucket", help="Artifact bucket (default: the one `pygirder cloud setup` made)."
    ),
]
PrefixOpt = Annotated[
    str | None, typer.Option("--prefix", help="Key prefix (default: the setup's, else artifacts/).")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="pygirder.toml (default: ./pygirder.toml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _where(bucket: str | None, prefix: str | None, config: Path | None) -> tuple[str, str]:
    """Bucket and prefix from the options, falling back to the account setup's."""
    if bucket is not None:
        return bucket, prefix or "artifacts/"
    try:
        from ..account import account_resources
        from ..config import load_config
    except ImportError as exc:
        raise PygirderError(
            f"give --bucket: the account setup is not available here ({exc})"
        ) from exc
    resources: dict[str, Any] = account_resources(load_config(config))
    return resources["bucket"], prefix or resources.get("artifact_prefix") or "artifacts/"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command("push")
def artifact_push(
    project_dir: Annotated[
        Path, typer.Argument(help="The project: a pyproject/setup.py project or plain .py files.")
    ] = Path("."),
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Keep the built tar.gz in this directory.")
    ] = None,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Build without the package index or build isolation: the project's build "
            "backend (and `wheel` for an old setuptools) must be installed here.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Build the artifact and print its name; ask AWS nothing, upload nothing.",
        ),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build the project and pygirder as wheels into one artifact and upload it once.

    The artifact is named by its SHA-256, so pushing unchanged code
    uploads nothing. Prints the s3:// URI and the SHA-256 instances verify.
    A packaged project is built as `python -m build --wheel` (or
    `pip wheel`) builds it: with build isolation, from pip's configured
    index. --offline builds with what is installed here instead.
    """
    logging.getLogger("pygirder.cloud.artifacts").setLevel(logging.INFO)
    if not project_dir.is_dir():
        typer.echo(
            f"error: project directory {project_dir} does not exist: give the directory "
            "that holds your grid functions (default: the current one)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        # A dry run asks AWS nothing, so it also works before `pygirder cloud setup`.
        where = None if dry_run else _where(bucket, prefix, config)
        with tempfile.TemporaryDirectory(prefix="pygirder-artifact-") as tmp:
            artifact = build_artifact(project_dir, out or tmp, offline=offline)
            if where is None:
                key_prefix = (prefix or "artifacts/").rstrip("/") + "/"
                uri = f"s3://{bucket or '<bucket>'}/{key_prefix}{artifact.name}"
            else:
                uri = push_artifact(artifact, *where)
    except (PygirderError, OSError) as exc:
        raise _fail(exc) from exc
    if as_json:
        found = {"uri": uri, "sha256": artifact.sha256, "manifest": artifact.manifest}
        typer.echo(json.dumps({**found, "uploaded": not dry_run}))
        return
    wheels = ", ".join(f"{w['name']} {w['version']}" for w in artifact.manifest["wheels"])
    typer.echo(f"{uri}\nsha256 {artifact.sha256}\nwheels {wheels}")
    if dry_run:
        typer.echo("dry run: nothing was uploaded", err=True)


@app.command("list")
def artifact_list(
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the artifacts on S3, newest first."""
    try:
        found = list_artifacts(*_where(bucket, prefix, config))
    except (PygirderError, OSError) as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(found, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("modified", "project", "pygirder", "size", "sha256", "uri")
    for item in found:
        table.add_row(
            item["modified"].strftime("%Y-%m-%d %H:%M"),
            item["project"],
            item["pygirder_version"],
            f"{item['size'] / 1e6:.1f} MB",
            item["sha256"][:12],
            item["uri"],
        )
    Console().print(table)
