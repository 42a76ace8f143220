"""`iadkit weights`: which pretrained backbones this machine can use, and how to get the others."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.console import Console
from rich.table import Table

from iadkit.cli import app


@app.command("weights")
def weights(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON instead of a table."),
    full_sha: bool = typer.Option(False, "--full-sha", help="Show whole sha256 digests, not their first 16 digits."),
) -> None:
    """List every backbone: where its weights come from, licence, availability here, sha256.

    Nothing is downloaded: backbones marked missing say which file to fetch (or which package to
    install) and where to put it.
    """
    from iadkit.backbones import WEIGHTS_DIR_ENV, available_backbones

    infos = available_backbones()
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    table = Table(title="Pretrained backbones (offline)")
    table.add_column("backbone", style="bold", no_wrap=True)
    table.add_column("architecture")
    table.add_column("weights from")
    table.add_column("licence")
    table.add_column("here", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    for i in infos:
        source = f"package {i.package}" if i.package else "your file " + " or ".join(i.files)
        digest = (i.sha256 if full_sha else i.sha256[:16]) if i.sha256 else "-"
        here = "[green]yes[/green]" if i.available else "[red]no[/red]"
        table.add_row(i.name, i.architecture, source, i.licence, here, digest)
    console = Console()
    console.print(table)
    for i in infos:
        # Printed outside the table so that paths and URLs are never cut.
        text = f"found: {i.path}" if i.available else i.hint
        console.print(f"[bold]{i.name}[/bold]: {text}", soft_wrap=True, highlight=False)
    from iadkit.methods.efficientad import PACKAGED_TEACHER, PACKAGED_TEACHER_LICENCE

    shipped = Table(title="Weights shipped inside iadkit (derived from a backbone above)")
    shipped.add_column("file", style="bold", no_wrap=True)
    shipped.add_column("what")
    shipped.add_column("licence")
    shipped.add_column("here", no_wrap=True)
    shipped.add_row(
        PACKAGED_TEACHER.name,
        "EfficientAD-S teacher distilled from efficientnet_lite0 (the default teacher; float16)",
        PACKAGED_TEACHER_LICENCE,
        "[green]yes[/green]" if PACKAGED_TEACHER.is_file() else "[red]no[/red]",
    )
    console.print(shipped)
    console.print(
        f"User-supplied weights are looked up in weights_path=, ${WEIGHTS_DIR_ENV}, then torch's download "
        "cache; every file is checked against iadkit's sha256 lockfile before use. Nothing is downloaded.",
        highlight=False,
    )
