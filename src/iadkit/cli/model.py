"""`iadkit methods | fit | predict | evaluate`: see the methods, train a model, score images, measure it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from iadkit.cli import app
from iadkit.errors import CalibrationWarning, IadkitError, InvalidParameterError

console = Console()


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are JSON where they parse (numbers, lists, true/false)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidParameterError(f"--param expects key=value (e.g. -p epochs=10), got {item!r}")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files, sorted."""
    from iadkit.data.io import IMAGE_EXTENSIONS

    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()))
        elif p.exists():
            files.append(p)
        else:
            raise IadkitError(f"{p}: no such file or folder")
    if not files:
        raise IadkitError(
            f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def load_split(data: str, category: str | None, layout: str, *, allow_missing_masks: bool) -> Any:
    """`load_dataset` with the CLI's options; `allow_missing_masks` only where the layout has it."""
    import warnings as _warnings

    from iadkit.data.layouts import detect_layout, layout_options, load_dataset, parse_source

    options: dict[str, Any] = {}
    if allow_missing_masks:
        resolved, location = parse_source(data, layout)
        if resolved == "auto":
            resolved = detect_layout(location)
        if "allow_missing_masks" in layout_options(resolved):
            options["allow_missing_masks"] = True
    with _warnings.catch_warnings():
        if allow_missing_masks:  # asked for: the count is not news
            _warnings.filterwarnings("ignore", message=".*allow_missing_masks=True.*")
        return load_dataset(data, category=category, layout=layout, **options)


@app.command("methods")
def methods_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON (for scripts)."),
    method: str | None = typer.Argument(None, help="Show one method's hyper-parameters in full."),
) -> None:
    """List every method: family, supervision, what it outputs, its paper.

    Example:  iadkit methods            (all)      iadkit methods patchcore     (one, with its hyper-parameters)
    """
    from iadkit.methods import available_methods, get_method

    if method is not None:
        cls = get_method(method)
        if as_json:
            typer.echo(json.dumps(_describe(cls), indent=2))
            return
        console.print(f"[bold]{cls.name}[/bold] — {cls.paper}", highlight=False)
        console.print(cls.__doc__ or "", highlight=False)
        return
    rows = [_describe(cls) for cls in available_methods().values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Methods")
    table.add_column("method", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("supervision")
    table.add_column("outputs")
    table.add_column("paper")
    for r in rows:
        outputs = "scores, maps" if r["produces_maps"] else "scores"
        extras = [k.replace("_", "-") for k in ("continual", "multi_class", "uses_depth") if r[k]]
        paper = r["paper"].split(",")[0] + ", " + r["paper"].rsplit(",", 1)[-1].strip()
        table.add_row(
            r["name"], r["family"], r["supervision"] + (f" ({', '.join(extras)})" if extras else ""), outputs, paper
        )
    console.print(table)
    console.print("`iadkit methods NAME` shows a method's hyper-parameters; pass them with `iadkit fit -p key=value`.")


def _describe(cls: Any) -> dict[str, Any]:
    from iadkit.methods.base import jsonable

    return {
        "name": cls.name,
        "family": cls.family,
        "supervision": cls.supervision,
        "continual": cls.continual,
        "multi_class": cls.multi_class,
        "produces_maps": bool(cls.produces_maps),
        "uses_depth": cls.uses_depth,
        "map_sigma": cls.map_sigma,
        "paper": cls.paper,
        "params": {n: jsonable(p.default) for n, (p, _) in cls._params.items()},
    }


@app.command()
def fit(
    method: str = typer.Option(
        ..., "--method", "-m", help="Method name, e.g. patchcore, padim (see `iadkit methods`)."
    ),
    data: str = typer.Option(
        ..., "--data", "-d", help="Dataset folder (MVTec/VisA/... layout, auto-detected) or 'elpv'."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (safetensors + JSON manifest)."),
    category: str | None = typer.Option(None, "--category", "-c", help="Category (product) to train on."),
    layout: str = typer.Option(
        "auto", "--layout", help="Dataset layout instead of detecting it (see `iadkit data list`)."
    ),
    image_size: int = typer.Option(224, help="Input size in pixels (square)."),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="Hyper-parameter key=value (repeatable)."),
    setting: str = typer.Option("vanilla", help="Data setting, e.g. vanilla, few_shot:k=4 (see the README)."),
    calibration_fraction: float | None = typer.Option(
        None,
        help="Share of the good training images held out to set the threshold "
        "(default 0.1, when at least 10 images remain to train on).",
    ),
    target_fpr: float = typer.Option(0.01, help="False-alarm rate on good images that the threshold allows."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps ..."),
    seed: int = typer.Option(0, help="Seed for the calibration split, the setting and the method's randomness."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing model file."),
    tile: int | None = typer.Option(
        None,
        help="High-resolution parts: train on tiles of TILE pixels cut from each good image (e.g. the image size); "
        "the model then predicts tile by tile.",
    ),
    overlap: float | None = typer.Option(None, help="Share of a tile shared with its neighbour (default 0.25)."),
) -> None:
    """Train a model on the good images of a dataset and save it.

    Everything is checked before training starts: the method and its parameters, the
    options, the data, and that OUT can be written.
    Example:  iadkit fit -m patchcore -d ./synth -c fabric -o fabric.iad
    """
    from iadkit.files import check_writable_file
    from iadkit.model import Model
    from iadkit.settings import apply_setting, check_combination, parse_setting, usable_training

    if out.exists() and not force:
        raise InvalidParameterError(f"{out} exists; pass --force to overwrite it or choose another --out")
    check_writable_file(out, "model file")
    if image_size < 16 or image_size > 4096:
        raise InvalidParameterError(f"--image-size must be between 16 and 4096 pixels, got {image_size}")
    if not 0.0 <= target_fpr < 1.0:
        raise InvalidParameterError(f"--target-fpr must be in [0, 1), got {target_fpr}")
    if calibration_fraction is not None and not 0.0 <= calibration_fraction < 1.0:
        raise InvalidParameterError(f"--calibration-fraction must be in [0, 1), got {calibration_fraction}")
    dev = _check_device(device)
    if overlap is not None and tile is None:
        raise InvalidParameterError("--overlap needs --tile (the tile size in pixels, e.g. --tile 256)")
    if tile is not None:
        from iadkit.tiling import Tiling

        Tiling(tile, overlap if overlap is not None else 0.25)  # checks both before training
    params = parse_params(param)
    params.setdefault("seed", seed)
    model = Model.create(method, image_size=image_size, **params).to(dev)
    model.detector.validate()
    setting_name, setting_params = parse_setting(setting)
    # Training never reads the test masks: a dataset missing some still trains.
    split = load_split(data, category, layout, allow_missing_masks=True)
    train, _ = apply_setting(
        setting_name, list(split.train) + list(split.train_anomalous), split.test, seed=seed, params=setting_params
    )
    note = check_combination(setting_name, model.detector, train)
    if note:
        console.print(note, highlight=False)
    train = usable_training(model.detector, train)  # the note said it: fit need not say it again
    console.print(f"fitting [bold]{method}[/] on {len(train)} training images of {split.name}/{split.category}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        model.fit(
            train,
            calibration_fraction=calibration_fraction,
            target_fpr=target_fpr,
            seed=seed,
            tile=tile,
            overlap=overlap,
        )
    model.info.update(dataset=str(data), category=split.category, setting=setting)
    model.save(out)
    console.print(f"saved [bold]{out}[/]  threshold: {_threshold_text(model)}", highlight=False)
    for w in caught:
        if issubclass(w.category, CalibrationWarning):
            console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _threshold_text(model: Any) -> str:
    thr = model.threshold
    if thr is None:
        return "unset (too few good images to hold any out; calibrate it with good images)"
    d = thr.details
    text = f"{thr.value:.5g} ({thr.rule}"
    if "n_good" in d:
        text += (
            f", from {d['n_good']} held-out good images: target FPR {d['target_fpr']}, resolution {d['resolution']:.3g}"
        )
    return text + ")"


def _check_device(device: str) -> str:
    from iadkit.model import check_device

    return check_device(device, "--device")


@app.command()
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `iadkit fit`."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.csv/.json and overlays/."),
    threshold: float | None = typer.Option(None, help="Override the model's stored threshold."),
    overlays: bool = typer.Option(True, help="Write heatmap overlay PNGs."),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows of an earlier run in OUT; score only the rest."),
    force: bool = typer.Option(
        False, "--force", help="Start over in an OUT that holds an earlier run's predictions.csv."
    ),
    executor: str = typer.Option("local", help="local, or ray to shard the files across Ray workers."),
    address: str | None = typer.Option(None, help="Ray cluster address (with --executor ray)."),
    device: str = typer.Option("cpu"),
    tile: int | None = typer.Option(
        None,
        help="Cut images larger than TILE pixels into tiles at the model's resolution (0: off; default: the model's own).",
    ),
    overlap: float | None = typer.Option(None, help="Share of a tile shared with its neighbour (default 0.25)."),
) -> None:
    """Score images: a CSV/JSON of scores and verdicts, and heatmap overlays.

    Results are written as they come; an interrupted run keeps what it scored (rerun with
    --resume). Unreadable images are listed with their error; the exit code is then 1.
    Example:  iadkit predict fabric.iad ./new_photos --out preds
    """
    from iadkit.batch import predict_folder, read_scored
    from iadkit.files import check_writable_dir
    from iadkit.model import Model
    from iadkit.store import read_manifest
    from iadkit.thresholds import manual_threshold

    if executor not in ("local", "ray"):
        raise InvalidParameterError(f"--executor {executor!r}: use local or ray")
    if executor == "local" and address:
        raise InvalidParameterError("--address is for the Ray executor; use --executor ray")
    if threshold is not None:
        manual_threshold(threshold)  # 'nan' parses as a float: refuse it before any work
    csv_path = out / "predictions.csv"
    if csv_path.exists() and not (resume or force):
        raise InvalidParameterError(
            f"{out} holds predictions.csv from an earlier run: pass --resume to keep its rows and score the rest, "
            "--force to start over, or choose another --out"
        )
    files = expand_images(images)
    model: Any = model_path
    if executor == "local":
        from iadkit.tiling import resolve_tiling

        model = Model.load(model_path, device=_check_device(device))
        model.tiling = resolve_tiling(model.tiling, tile, overlap)
        if model.tiling is not None:
            model._check_tiling(model.tiling)
    elif tile is not None or overlap is not None:
        raise InvalidParameterError(
            "--tile/--overlap work with --executor local; Ray workers use the model's own tiling"
        )
    elif executor == "ray":
        read_manifest(model_path)  # a clear error here, not in every worker
    check_writable_dir(out, "output folder")  # after the inputs are known to be usable
    try:
        result = predict_folder(
            model,
            files,
            out,
            batch_size=batch_size,
            threshold=threshold,
            overlays=overlays,
            resume=resume,
            executor=executor,
            address=address,
            progress=True,
        )
    except KeyboardInterrupt:
        n_kept = len(read_scored(csv_path))
        console.print(
            f"[red]interrupted[/red]: {n_kept} scored image(s) are kept in {csv_path}; run the same command "
            "with --resume to score the rest",
            highlight=False,
        )
        raise typer.Exit(130) from None
    scored = len(result.rows) - len(result.failed)
    verdict = f"{result.n_flagged} of {scored} flagged anomalous" if result.threshold is not None else "no threshold"
    kept = f" ({result.skipped} kept from the earlier run)" if result.skipped else ""
    console.print(f"{scored} images scored{kept}, {verdict}; results in [bold]{out}[/]", highlight=False)
    if result.failed:
        for row in result.failed[:10]:
            console.print(
                f"[red]failed[/red] {row['path']}: {row['error']}", highlight=False, soft_wrap=True
            )  # a path is never cut
        more = f" (first 10 shown; all in {out / 'predictions.csv'})" if len(result.failed) > 10 else ""
        console.print(f"[red]{len(result.failed)} image(s) could not be scored[/red]{more}", highlight=False)
        raise typer.Exit(1)


@app.command()
def evaluate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file from `iadkit fit`."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset folder or 'elpv' (its test split is used)."),
    category: str | None = typer.Option(None, "--category", "-c"),
    layout: str = typer.Option(
        "auto", "--layout", help="Dataset layout instead of detecting it (see `iadkit data list`)."
    ),
    allow_missing_masks: bool = typer.Option(
        False,
        "--allow-missing-masks",
        help="Keep defective test images that have no mask (pixel metrics then unavailable).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON (for scripts)."),
    batch_size: int = typer.Option(16, min=1),
    device: str = typer.Option("cpu"),
) -> None:
    """Measure a model on a labelled test set: image and pixel metrics, AUPRO, speed.

    Example:  iadkit evaluate fabric.iad -d ./synth -c fabric
    """
    from iadkit.evaluation import evaluate as run_evaluation
    from iadkit.model import Model

    model = Model.load(model_path, device=_check_device(device))
    split = load_split(
        data, category if category else model.info.get("category"), layout, allow_missing_masks=allow_missing_masks
    )
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
