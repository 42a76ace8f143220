"""`iadkit` command line: a thin layer over the Python API.

Each command group lives in its own module and registers itself on `app`:
data.py (`iadkit data ...`), weights.py (`iadkit weights`), model.py (`fit`, `predict`,
`evaluate`), bench.py (`benchmark`, `report`, `demo`), serve.py (`serve`), export.py (`export`).
"""

from __future__ import annotations

from importlib import import_module

import typer

app = typer.Typer(
    name="iadkit",
    help=(
        "Industrial image anomaly detection. Train on photos of good parts, score new photos, "
        "see where the defect is, and compare methods fairly.\n\n"
        "Typical use:  iadkit data synth --out synth  ->  iadkit fit --method patchcore "
        "--data synth --category fabric --out fabric.iad  ->  iadkit predict fabric.iad IMAGES --out preds"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _module in ("data", "weights", "model", "bench", "serve", "export"):
    try:
        import_module(f"iadkit.cli.{_module}")
    except ModuleNotFoundError as exc:  # a command group not written yet
        if exc.name != f"iadkit.cli.{_module}":
            raise


def main() -> None:
    """Entry point: user errors print one clear line instead of a traceback."""
    from iadkit.errors import IadkitError

    try:
        app()
    except IadkitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
