"""`iadkit export`: a model file as one ONNX file for the torch-free runtime (`iadkit.runtime`)."""

from __future__ import annotations

from pathlib import Path

import typer

from iadkit.cli import app
from iadkit.errors import InvalidParameterError


@app.command()
def export(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `iadkit fit`."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    check: bool = typer.Option(True, help="Compare the exported graph with the model before writing."),
) -> None:
    """Export a model to ONNX: the whole inference graph and its threshold, preprocessing and
    heat-map range, for `iadkit.runtime` (onnxruntime + numpy + Pillow, no torch) and
    `iadkit serve --runtime onnx`.

    Example:  iadkit export fabric.iad --out fabric.onnx
    """
    from iadkit.files import check_writable_file
    from iadkit.model import Model

    if out.exists() and not force:
        raise InvalidParameterError(f"{out} exists; pass --force to overwrite it or choose another --out")
    check_writable_file(out, "ONNX file")
    model = Model.load(model_path)
    path = model.export_onnx(out, check=check)
    size_mb = path.stat().st_size / 1e6
    typer.echo(
        f"exported {model.method} ({model.preprocess.output_size[0]}x{model.preprocess.output_size[1]} px, "
        f"threshold {model.threshold.value if model.threshold else 'unset'}) to {path} ({size_mb:.1f} MB)"
    )
