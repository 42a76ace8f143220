"""`iadkit fit | predict | evaluate`: train a model, score images, measure it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from iadkit.cli import app
from iadkit.errors import IadkitError

console = Console()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are JSON where they parse (numbers, lists, true/false)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise IadkitError(f"--param expects key=value, got {item!r}")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files, sorted."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        elif p.exists():
            files.append(p)
        else:
            raise IadkitError(f"{p}: no such file or folder")
    if not files:
        raise IadkitError(f"no images found in {', '.join(map(str, inputs))} (looked for {sorted(IMAGE_SUFFIXES)})")
    return files


@app.command()
def fit(
    method: str = typer.Option(..., "--method", "-m", help="Method name, e.g. patchcore, padim (see `iadkit fit --list`)."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset folder (MVTec/VisA/... layout, auto-detected) or 'elpv'."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (safetensors + JSON manifest)."),
    category: Optional[str] = typer.Option(None, "--category", "-c", help="Category (product) to train on."),
    image_size: int = typer.Option(224, help="Input size in pixels (square)."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Hyper-parameter key=value (repeatable)."),
    calibration_fraction: float = typer.Option(
        0.1, help="Share of the good training images held out to set the threshold."
    ),
    target_fpr: float = typer.Option(0.01, help="False-alarm rate on good images that the threshold allows."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps ..."),
    seed: int = typer.Option(0, help="Seed for the calibration split and the method's randomness."),
) -> None:
    """Train a model on the good images of a dataset and save it.

    Example:  iadkit fit -m patchcore -d ./synth -c fabric -o fabric.iad
    """
    import torch

    from iadkit.data import load_dataset
    from iadkit.model import Model

    torch.manual_seed(seed)
    split = load_dataset(data, category=category)
    params = parse_params(param)
    model = Model.create(method, image_size=image_size, **params).to(device)
    console.print(f"fitting [bold]{method}[/] on {len(split.train)} good images of {split.name}/{split.category}")
    model.fit(split.train, calibration_fraction=calibration_fraction, target_fpr=target_fpr, seed=seed)
    model.info.update(dataset=str(data), category=split.category)
    model.save(out)
    thr = f"{model.threshold.value:.5g} ({model.threshold.rule}, target FPR {target_fpr})" if model.threshold else "unset"
    console.print(f"saved [bold]{out}[/]  threshold: {thr}")


@app.command()
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `iadkit fit`."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.csv/.json and overlays/."),
    threshold: Optional[float] = typer.Option(None, help="Override the model's stored threshold."),
    overlays: bool = typer.Option(True, help="Write heatmap overlay PNGs."),
    batch_size: int = typer.Option(16),
    executor: str = typer.Option("local", help="local, or ray to shard the files across Ray workers."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (with --executor ray)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Score images: a CSV/JSON of scores and verdicts, and heatmap overlays.

    Example:  iadkit predict fabric.iad ./new_photos --out preds
    """
    from iadkit.model import Model
    from iadkit.store import atomic_write_text

    files = expand_images(images)
    out.mkdir(parents=True, exist_ok=True)
    if executor != "local":
        from iadkit.bench.executors import predict_folder

        rows = predict_folder(str(model_path), [str(f) for f in files], executor=executor, address=address)
        if threshold is not None:
            for r in rows:
                r["anomalous"] = r["score"] > threshold
        model = None
    else:
        model = Model.load(model_path, device=device)
        result = model.predict(files, batch_size=batch_size, threshold=threshold, keep_maps=overlays, progress=True)
        rows = result.rows()
        if overlays and result.maps is not None:
            write_overlays(model, files, result.maps, out / "overlays", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "score", "anomalous"] + (["overlay"] if overlays and model else []))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    atomic_write_text(out / "predictions.json", json.dumps(rows, indent=1))
    n_bad = sum(1 for r in rows if r["anomalous"])
    verdict = f"{n_bad} of {len(rows)} flagged anomalous" if rows and rows[0]["anomalous"] is not None else "no threshold"
    console.print(f"{len(rows)} images scored, {verdict}; results in [bold]{out}[/]")


def write_overlays(model: Any, files: list[Path], maps: Any, folder: Path, rows: list[dict]) -> None:
    """Heatmap over the image as the model saw it, coloured on the model's fixed range."""
    from iadkit.data.io import read_image
    from iadkit.viz import save_overlay

    folder.mkdir(parents=True, exist_ok=True)
    lo_hi = model.map_range or (float(maps.min()), float(maps.max()))
    used: set[str] = set()
    for f, amap, row in zip(files, maps, rows):
        rgb = model.preprocess.geometry(model.preprocess.to_unit_float(read_image(f))).permute(1, 2, 0).numpy()
        name = f.stem
        while name in used:  # same stem in two folders
            name += "_"
        used.add(name)
        target = folder / f"{name}.png"
        save_overlay(target, rgb, amap, map_range=lo_hi)
        row["overlay"] = str(target)


@app.command()
def evaluate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `iadkit fit`."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset folder or 'elpv' (its test split is used)."),
    category: Optional[str] = typer.Option(None, "--category", "-c"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON (for scripts)."),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu"),
) -> None:
    """Measure a model on a labelled test set: image and pixel metrics, AUPRO, speed.

    Example:  iadkit evaluate fabric.iad -d ./synth -c fabric
    """
    from iadkit.data import load_dataset
    from iadkit.evaluation import evaluate as run_evaluation
    from iadkit.model import Model

    model = Model.load(model_path, device=device)
    split = load_dataset(data, category=category if category else model.info.get("category"))
    result = run_evaluation(model, split.test, batch_size=batch_size, progress=not as_json)
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    table = Table(title=f"{model.method} on {split.name}/{split.category} ({len(result.paths)} test images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
