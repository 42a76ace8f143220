"""`iadkit` command line: a thin layer over the Python API.

Each command group lives in its own module and registers itself on `app`:
data.py (`iadkit data ...`), weights.py (`iadkit weights`), model.py (`fit`, `predict`,
`evaluate`), bench.py (`benchmark`, `report`, `demo`), serve.py (`serve`), export.py (`export`).
"""

from __future__ import annotations

import os
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

_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: bool = typer.Option(
        False,
        "--debug",
        help="On an error, show the full traceback, not just the one-line message (or IADKIT_DEBUG=1).",
    ),
) -> None:
    _DEBUG["on"] = _DEBUG["on"] or debug


for _module in ("data", "weights", "model", "bench", "serve", "export"):
    try:
        import_module(f"iadkit.cli.{_module}")
    except ModuleNotFoundError as exc:  # a command group not written yet
        if exc.name != f"iadkit.cli.{_module}":
            raise


def main(argv: list[str] | None = None) -> None:
    """Entry point. A mistake a user can make (an `IadkitError`: a wrong option, a missing
    or unreadable file, an unwritable output) prints one line saying what is wrong and what
    to do, and exits with 2; a file the system refuses (an `OSError` such as permission
    denied) too. ``--debug`` (or ``IADKIT_DEBUG=1``) adds the traceback. Anything else is a
    bug and keeps Python's traceback. Ctrl-C exits with 130 (commands that keep partial
    work say how to resume)."""
    from iadkit.errors import IadkitError

    _DEBUG["on"] = os.environ.get("IADKIT_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="iadkit")
    except (IadkitError, OSError) as exc:
        if _DEBUG["on"]:
            import traceback

            traceback.print_exc()
        message = str(exc) if isinstance(exc, IadkitError) else _os_error_text(exc)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise SystemExit(130) from None


def _os_error_text(exc: OSError) -> str:
    """'permission denied: out/model.iad' rather than "[Errno 13] Permission denied: '...'"."""
    what = (exc.strerror or str(exc)).lower()
    where = exc.filename if exc.filename is not None else ""
    return f"{what}: {where}" if where else what
