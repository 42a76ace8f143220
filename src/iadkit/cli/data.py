"""`iadkit data ...`: see what a dataset folder holds, and create the synthetic set.

A thin layer over :mod:`iadkit.data`: ``list`` (categories and layout, or the built-in
sources), ``info`` (counts per split and defect type, masks, image sizes) and ``synth``
(write the synthetic MVTec-layout dataset, then show its ``info``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from iadkit.cli import app

data_app = typer.Typer(
    name="data",
    help=(
        "Inspect datasets and create the synthetic one.\n\n"
        "Examples:\n\n"
        "  iadkit data list                      (built-in sources and readable layouts)\n\n"
        "  iadkit data list ~/data/mvtec_ad      (categories and detected layout)\n\n"
        "  iadkit data info ~/data/mvtec_ad --category bottle\n\n"
        "  iadkit data info elpv --category mono\n\n"
        "  iadkit data synth --out synth --seed 0 --preset demo"
    ),
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _console() -> Console:
    return Console(width=120)


def _image_desc(sample) -> str:
    """'256x256 RGB uint8 PNG' from the header (or the in-memory array)."""
    if sample.image is not None:
        h, w = sample.image.shape[:2]
        c = sample.image.shape[2] if sample.image.ndim == 3 else 1
        return f"{w}x{h} {'gray' if c == 1 else 'RGB'} {sample.image.dtype} (in memory)"
    from iadkit.data.io import probe_image
    from iadkit.errors import ImageReadError

    try:
        info = probe_image(sample.path)
    except ImageReadError as exc:
        return f"unreadable: {exc}"
    return f"{info.width}x{info.height} {'gray' if info.channels == 1 else 'RGB'} {info.dtype} {info.format}"


def _sampled(samples: list, n: int) -> list:
    if n <= 0 or not samples:
        return []
    if len(samples) <= n:
        return list(samples)
    step = (len(samples) - 1) / (n - 1) if n > 1 else 0
    return [samples[round(i * step)] for i in range(n)]


def _mask_cell(samples: list) -> str:
    anomalous = [s for s in samples if s.label == 1]
    if not anomalous:
        return "-"
    found = sum(1 for s in anomalous if s.has_mask)
    if found == len(anomalous):
        return f"[green]{found}/{len(anomalous)}[/green]"
    if found == 0:
        return f"[red]none (0/{len(anomalous)})[/red]"
    return f"[yellow]{found}/{len(anomalous)} ({len(anomalous) - found} missing)[/yellow]"


def _load_for_info(source: str, category: str, layout: str):
    """Load tolerating missing masks (info reports them instead of failing)."""
    from iadkit.data.layouts import layout_options, load_dataset, parse_source

    resolved, location = parse_source(source, layout)
    if resolved == "auto":
        from iadkit.data import detect_layout

        resolved = detect_layout(location)
    options = {"allow_missing_masks": True} if "allow_missing_masks" in layout_options(resolved) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_dataset(source, category=category, layout=layout, **options)


def print_info(source: str, category: str | None = None, layout: str = "auto", sample: int = 3) -> None:
    """The body of ``iadkit data info`` (also used after ``iadkit data synth``)."""
    from iadkit.data import detect_layout, list_categories

    console = _console()
    detected = detect_layout(source) if layout == "auto" else layout
    categories = [category] if category else list_categories(source, layout=layout)
    console.print(
        f"[bold]{source}[/bold]: layout [cyan]{detected}[/cyan], {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}",
        highlight=False,
    )
    for cat in categories:
        split = _load_for_info(source, cat, layout)
        table = Table(title=f"{split.name} / {cat}  ({split.layout})", title_justify="left")
        table.add_column("split", style="bold", no_wrap=True)
        table.add_column("defect type", no_wrap=True)
        table.add_column("images", justify="right")
        table.add_column("masks", no_wrap=True)
        for part, samples in split.splits().items():
            by_type: dict[str, list] = {}
            for s in samples:
                by_type.setdefault(s.defect_type or "-", []).append(s)
            for i, (dtype, group) in enumerate(sorted(by_type.items(), key=lambda kv: (kv[0] != "good", kv[0]))):
                table.add_row(part if i == 0 else "", dtype, str(len(group)), _mask_cell(group))
            if len(by_type) > 1:
                table.add_row("", "[dim]total[/dim]", f"[dim]{len(samples)}[/dim]", "")
        console.print(table)
        sizes: Counter[str] = Counter()
        for samples in split.splits().values():
            for s in _sampled(samples, sample):
                sizes[_image_desc(s)] += 1
        if sizes:
            shown = "; ".join(f"{desc} (x{n})" for desc, n in sizes.most_common())
            console.print(f"  images (sampled): {shown}", highlight=False, soft_wrap=True)
        if split.test_anomalous and not split.has_masks:
            console.print("  [yellow]pixel metrics unavailable: not every anomalous test image has a mask[/yellow]")
        if split.notes:
            console.print(f"  protocol: {split.notes}", highlight=False, soft_wrap=True)
        if split.license:
            console.print(f"  licence: {split.license}", highlight=False, soft_wrap=True)


@data_app.command("list")
def list_cmd(
    path: str | None = typer.Argument(
        None, help="A dataset folder (or 'elpv'). Leave out to list the built-in sources and readable layouts."
    ),
    layout: str = typer.Option(
        "auto",
        "--layout",
        help="Force a layout instead of detecting it: mvtec, btad, loco, mvtec3d, visa, kolektor2, folder.",
    ),
) -> None:
    """List the categories of a dataset folder and its detected layout, or the built-in sources.

    Examples:

      iadkit data list

      iadkit data list ~/data/mvtec_ad

      iadkit data list ~/data/my_parts --layout folder
    """
    from iadkit.data import LAYOUTS, detect_layout, list_categories

    console = _console()
    if path is not None:
        detected = detect_layout(path) if layout == "auto" else layout
        categories = list_categories(path, layout=layout)
        console.print(
            f"[bold]{path}[/bold]: layout [cyan]{detected}[/cyan] ({LAYOUTS.get(detected, '')})",
            highlight=False,
            soft_wrap=True,
        )
        for c in categories:
            console.print(f"  {c}", highlight=False)
        console.print(
            f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'}. Details: iadkit data info {path} --category {categories[0] if categories else 'NAME'}",
            highlight=False,
            soft_wrap=True,
        )
        return

    from iadkit.data.elpv import ELPV_CATEGORIES, ELPV_LICENSE

    table = Table(title="Built-in sources (no download needed)", title_justify="left")
    table.add_column("source", style="bold", no_wrap=True)
    table.add_column("categories")
    table.add_column("what")
    table.add_column("licence")
    table.add_row(
        "elpv",
        ", ".join(ELPV_CATEGORIES),
        "2,624 real electroluminescence solar-cell images, 300x300 gray; image-level labels only",
        "CC BY-NC-SA 4.0 (non-commercial)",
    )
    try:
        from iadkit.data.synthetic import CATEGORIES as SYNTH_CATEGORIES

        synth_cats = ", ".join(SYNTH_CATEGORIES)
        synth_what = "procedural textures and objects with pixel masks; create with: iadkit data synth --out DIR"
    except ImportError as exc:
        synth_cats = "-"
        synth_what = f"[red]not available in this installation ({exc})[/red]"
    table.add_row("synthetic:DIR", synth_cats, synth_what, "generated by you (no restriction)")
    console.print(table)
    console.print(f"ELPV licence: {ELPV_LICENSE}", highlight=False, soft_wrap=True)
    layouts = Table(title="Layouts read from disk (detected automatically)", title_justify="left")
    layouts.add_column("layout", style="bold", no_wrap=True)
    layouts.add_column("structure")
    for name, desc in LAYOUTS.items():
        if name != "elpv":
            layouts.add_row(name, desc)
    console.print(layouts)


@data_app.command("info")
def info_cmd(
    path: str = typer.Argument(..., help="A dataset folder, 'synthetic:DIR', or 'elpv'."),
    category: str | None = typer.Option(None, "--category", "-c", help="Only this category (default: all)."),
    layout: str = typer.Option("auto", "--layout", help="Force a layout instead of detecting it."),
    sample: int = typer.Option(3, "--sample", min=0, help="Images per split whose size/mode is read (headers only)."),
) -> None:
    """Show, per category, the images per split and defect type, whether masks are present, and image sizes.

    Missing masks are reported here instead of stopping with an error.

    Examples:

      iadkit data info ~/data/mvtec_ad --category bottle

      iadkit data info synthetic:./synth

      iadkit data info elpv -c mono
    """
    print_info(path, category=category, layout=layout, sample=sample)


@data_app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (MVTec layout); created if missing."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: int | None = typer.Option(None, "--size", help="Image side in pixels (default: the preset's)."),
    preset: str = typer.Option("small", "--preset", help="small (tests: tiny, fast) or demo (more and larger images)."),
    categories: list[str] | None = typer.Option(
        None, "--categories", help="Categories to generate (repeat the option or separate with commas; default: all)."
    ),
) -> None:
    """Write the synthetic dataset (MVTec AD layout, with pixel masks), then show its info.

    The result loads like any MVTec-layout folder: --data DIR --category fabric.

    Examples:

      iadkit data synth --out synth

      iadkit data synth --out synth --seed 1 --preset demo --size 160

      iadkit data synth --out synth --categories fabric,metal
    """
    try:
        from iadkit.data.synthetic import generate
    except ImportError as exc:
        typer.secho(
            f"error: the synthetic generator is not available in this installation ({exc}).",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1) from None
    from iadkit.files import check_writable_dir

    check_writable_dir(out, "output folder")  # before generating anything
    kwargs: dict = {"seed": seed, "preset": preset}
    if size is not None:
        kwargs["image_size"] = size
    if categories:
        kwargs["categories"] = [c.strip() for item in categories for c in item.split(",") if c.strip()]
    generate(out, **kwargs)
    print_info(str(out), layout="mvtec")
    _console().print(
        f"Next: iadkit fit --method patchcore --data {out} --category NAME --out NAME.iad", highlight=False
    )
