"""`iadkit serve`: score images over HTTP and in a web page."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from iadkit.cli import app
from iadkit.errors import IadkitError


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH`` (the name defaults to the file name without its suffix)."""
    name, sep, rest = arg.partition("=")
    if sep and name and rest and not Path(arg).exists():
        return name, Path(rest)
    return None, Path(arg)


@app.command()
def serve(
    models: list[str] = typer.Argument(
        ..., metavar="MODEL...", help="Model files from `iadkit fit` (PATH or NAME=PATH); served by name."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    runtime: str = typer.Option(
        "torch",
        help="torch (model files from `iadkit fit`) or onnx (files from `iadkit export`; no torch in the server).",
    ),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1, mps ..."),
    max_file_mb: float = typer.Option(20.0, help="Largest accepted image file, in MB."),
    max_request_mb: float = typer.Option(64.0, help="Largest request (all its files together), in MB."),
    max_files: int = typer.Option(32, help="Most images in one request."),
    tile: int | None = typer.Option(
        None,
        help="Cut images larger than TILE pixels into tiles at the model's resolution (0: off; default: the model's own).",
    ),
    overlap: float | None = typer.Option(None, help="Share of a tile shared with its neighbour (default 0.25)."),
    max_pixels: int | None = typer.Option(
        None, help="Largest decoded image, height x width (default 80 million, or IADKIT_MAX_PIXELS)."
    ),
) -> None:
    """Serve models over HTTP with a web page to drop images on and see their heat maps.

    Example:  iadkit serve fabric.iad --port 8000, then open http://127.0.0.1:8000/
    """
    from iadkit.serve import require_extra

    require_extra()
    from iadkit.serve.app import Limits, run
    from iadkit.serve.backend import load_predictor

    if not 0 < port < 65536:
        raise IadkitError(f"--port must be 1..65535, got {port}")
    if min(max_file_mb, max_request_mb) <= 0 or max_files < 1 or (max_pixels is not None and max_pixels < 1):
        raise IadkitError("--max-file-mb, --max-request-mb, --max-files and --max-pixels must be positive")
    from iadkit.data.io import default_max_pixels

    pixel_limit = max_pixels if max_pixels is not None else default_max_pixels()
    predictors = []
    names: dict[str, Path] = {}
    for arg in models:
        name, path = parse_model_arg(arg)
        predictor = load_predictor(path, name, runtime=runtime, device=device, tile=tile, overlap=overlap)
        if predictor.name in names:
            raise IadkitError(
                f"{path} and {names[predictor.name]} would both be served as {predictor.name!r}; name them: NAME={path}"
            )
        names[predictor.name] = path
        predictors.append(predictor)
        typer.echo(
            f"model {predictor.name}: {predictor.method}, input {predictor.input_size}, threshold {predictor.threshold}"
        )
    limits = Limits(
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_file_bytes=int(max_file_mb * 1024 * 1024),
        max_files=max_files,
        max_pixels=pixel_limit,
    )
    shown = f"[{host}]" if _is_ipv6(host) else host
    if not _is_loopback(host):
        typer.secho(
            f"warning: listening on {host}: anyone who can reach this machine can use the models and move "
            "their thresholds (there is no login); put it behind an authenticating proxy on a shared network",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"page: http://{shown}:{port}/   (Ctrl-C to stop)")
    run(predictors, host=host, port=port, limits=limits)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
