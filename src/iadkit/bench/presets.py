"""Named benchmark grids: ``demo`` (what `iadkit demo` runs) and ``full``.

Per-method settings live in one table per preset, one row per method, so a reader sees at a
glance what every method was given. The methods themselves come from `available_methods()`
at run time: a method added to iadkit joins the presets automatically (with the table's
default row when it has no row of its own).

Hyper-parameters a method does not accept are dropped with a note (the table is written
for the whole method zoo; a method may name a knob differently). Everything not set here is
the method's own default, i.e. its paper's setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iadkit.bench.config import BenchConfig, BenchConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    size: int  # input size (square) on the synthetic categories
    elpv_size: int  # input size on ELPV (300x300 originals)
    params: dict[str, Any] = field(default_factory=dict)


# -- demo: every method, small CPU schedules -------------------------------------------------
# Budget: the whole grid (10 methods x 8 categories) in under 10 minutes on 2 CPU cores,
# run as two single-threaded worker processes (`iadkit demo` does that by default).
# Measured on a busy 2-core machine: with 30 training images, 96 px and 1-3 epochs the
# grid took 160 s (90 CPU seconds inside the cells: memory banks ~1 s per cell, training
# methods 1-2 s); this table spends about three times that, on more images and epochs.
# The slow feature-level methods drop their stride-4 level (most of the positions), the
# student-teacher pair runs at 64 px, and training methods use batch 8 so that a few
# epochs still make a few dozen optimiser steps.
# The demo shows the pipeline and how methods compare; it does not reproduce their papers
# (the `full` preset runs every method with its own defaults).
DEEP = ("blocks.2", "blocks.4")  # EfficientNet-Lite0 strides 8 and 16
#
# fmt: off
#   method                      size  ELPV   hyper-parameters
DEMO_TABLE: dict[str, Row] = {
    "patchcore":            Row(96,   96, {}),
    "padim":                Row(96,   96, {}),
    "spade":                Row(96,   96, {"layers": DEEP}),
    "cfa":                  Row(96,   96, {"epochs": 3, "batch_size": 8, "layers": DEEP}),
    "stfpm":                Row(64,   64, {"epochs": 4, "batch_size": 8}),
    # RD: 4 epochs left it at 0.699 mean image AUROC, 8 give 0.754 (about 3 s of CPU per cell)
    "reverse_distillation": Row(64,   64, {"epochs": 8, "batch_size": 8}),
    "fastflow":             Row(96,   96, {"epochs": 4, "batch_size": 8, "layers": DEEP, "flow_steps": 4}),
    "cflow":                Row(96,   96, {"epochs": 2, "batch_size": 8, "layers": DEEP, "coupling_blocks": 4}),
    "cutpaste":             Row(96,   96, {"epochs": 3, "batch_size": 8}),
    "simplenet":            Row(96,   96, {"epochs": 4, "batch_size": 8}),
    # SoftPatch costs what PatchCore costs (0.5 s CPU per synthetic cell at 96 px).
    "softpatch":            Row(96,   96, {}),
    # RegAD meta-trains on the other synthetic categories in every cell: one epoch over 8
    # images each, 2 supports per query; with the demo's 60 training images the 22-fold
    # support augmentation (meant for 1-8 shots) is left out. 4-6 s CPU per cell at 96 px
    # (defaults: 38 s), image AUROC fabric / washer 0.944 / 0.977 (defaults 0.900 / 0.998).
    "regad":                Row(96,   96, {"meta_epochs": 1, "meta_shots": 2, "meta_images_per_category": 8,
                                           "augment_support": False}),
    # Semi-supervised methods run only where a setting supplies labelled defects (presets
    # currently list unsupervised methods); these rows are their CPU-sized schedules:
    # 100 batches of 16, last stage trained. Measured at 96 px with 5 labelled defects:
    # DevNet 14 s CPU, AUROC metal 0.968 / fabric 0.389; DRA 19 s, 0.987 / 0.734.
    "devnet":               Row(96,   96, {"epochs": 5, "steps_per_epoch": 20, "batch_size": 16, "lr": 1e-3,
                                           "finetune_from": "blocks.6"}),
    "dra":                  Row(96,   96, {"epochs": 5, "steps_per_epoch": 20, "batch_size": 16, "lr": 1e-3,
                                           "finetune_from": "blocks.6"}),
    # the transformer trains on features computed once; its cost is the epochs, not the size
    # (about 10 s of CPU per cell)
    "uniad":                Row(64,   64, {"epochs": 20}),
    # diffusion: a width-8 U-Net for 5 epochs (about 9 s of CPU per cell) shows the pipeline,
    # not the method: its scores are near chance (DDAD needs minutes of CPU, see methods/ddad.py)
    "ddad":                 Row(64,   64, {"epochs": 5, "batch_size": 4, "base_width": 8, "adaptation_epochs": 0}),
    # No backbone: networks trained from scratch on [0, 1] pixels, at 64 px (GANomaly needs a
    # power of two). A few CPU seconds cannot train them far: these rows show the pipeline,
    # not the methods' quality (see each module's docstring for longer schedules).
    "autoencoder":          Row(64,   64, {"patch_size": 64, "epochs": 20, "batch_size": 8}),
    "draem":                Row(64,   64, {"epochs": 6, "batch_size": 8, "lr": 1e-3, "recon_width": 8, "disc_width": 8}),
    "ganomaly":             Row(64,   64, {"epochs": 15, "batch_size": 8, "base_width": 16}),
    # EfficientAD: the default teacher ships with iadkit (no distillation); the student and
    # autoencoder get 100 of the default 1000 steps here
    "efficientad":          Row(64,   64, {"steps": 100}),
}
# fmt: on
DEMO_DEFAULT = Row(96, 96, {"epochs": 3, "batch_size": 8})

# The synthetic demo set is used whole (60 training, 44-52 test images per category).
# ELPV's protocol split has 754 training and 1,575 test cells ("all"): the demo takes a
# stratified subsample with a fixed seed, marked '*' in every table.
DEMO_SYNTH_SUBSAMPLE: dict[str, int] | None = None
DEMO_ELPV_SUBSAMPLE = {"train": 40, "test": 60}

# -- full: paper defaults at IM-IAD's input size ----------------------------------------------
FULL_TABLE: dict[str, Row] = {}
FULL_DEFAULT = Row(256, 256, {})


def _methods_for(table: dict[str, Row], default: Row, only: list[str] | None) -> list[tuple[str, Row]]:
    from iadkit.methods import available_methods

    registry = {
        name: cls
        for name, cls in available_methods().items()
        if not name.startswith("test_")
        and getattr(cls, "supervision", "unsupervised") == "unsupervised"
        and not getattr(cls, "uses_depth", False)  # the presets' data have no point maps
    }
    if only:
        unknown = [m for m in only if m not in registry]
        if unknown:
            raise BenchConfigError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(registry)}")
        names = only
    else:
        names = [m for m in table if m in registry] + [m for m in registry if m not in table]
    out = []
    for name in names:
        row = table.get(name, default)
        accepted = set(registry[name].param_names())
        dropped = sorted(set(row.params) - accepted)
        if dropped:
            log.info("preset: %s does not take %s; using its default", name, ", ".join(dropped))
        out.append((name, Row(row.size, row.elpv_size, {k: v for k, v in row.params.items() if k in accepted})))
    if not out:
        raise BenchConfigError("no unsupervised method is installed; nothing to benchmark")
    return out


def _config(
    name: str,
    methods: list[tuple[str, Row]],
    synth_dir: Path,
    *,
    synth_subsample: dict[str, Any] | None,
    elpv_subsample: dict[str, Any] | None,
    elpv: bool,
    description: str,
    gallery_size: int,
) -> BenchConfig:
    datasets: list[dict[str, Any]] = [{"source": f"synthetic:{synth_dir}", "subsample": synth_subsample}]
    if elpv:
        datasets.append({"source": "elpv", "categories": ["mono", "poly", "all"], "subsample": elpv_subsample})
    return BenchConfig.parse(
        {
            "name": name,
            "description": description,
            "methods": [
                {"name": m, "image_size": r.size, "image_size_for": {"elpv": r.elpv_size}, "params": r.params}
                for m, r in methods
            ],
            "datasets": datasets,
            "settings": ["vanilla"],
            "seeds": [0],
            "gallery_size": gallery_size,
        },
        origin=f"preset {name!r}",
    )


def demo(root: Path, methods: list[str] | None = None, elpv: bool = True) -> BenchConfig:
    return _config(
        "demo",
        _methods_for(DEMO_TABLE, DEMO_DEFAULT, methods),
        Path(root) / "synth",
        synth_subsample=DEMO_SYNTH_SUBSAMPLE,
        elpv_subsample=DEMO_ELPV_SUBSAMPLE,
        elpv=elpv,
        description="every method on the synthetic categories and ELPV (subsampled), small CPU schedules",
        gallery_size=3,
    )


def full(root: Path, methods: list[str] | None = None, elpv: bool = True) -> BenchConfig:
    return _config(
        "full",
        _methods_for(FULL_TABLE, FULL_DEFAULT, methods),
        Path(root) / "synth",
        synth_subsample=None,
        elpv_subsample=None,
        elpv=elpv,
        description="every method with its paper defaults at 256 px, full synthetic and ELPV protocol splits",
        gallery_size=4,
    )


PRESETS: dict[str, Callable[..., BenchConfig]] = {"demo": demo, "full": full}
SYNTH_PRESET = {"demo": "demo", "full": "demo"}  # the synthetic generator's preset each one uses


def get_preset(name: str, root: str | Path, *, methods: list[str] | None = None, elpv: bool = True) -> BenchConfig:
    """The preset's config; its synthetic data lives in ``root/synth`` (see `ensure_synthetic`).

    The path is made absolute so Ray workers, whose working folder may differ, find it.
    """
    if name not in PRESETS:
        raise BenchConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](Path(root).resolve(), methods=methods, elpv=elpv)


def ensure_synthetic(config: BenchConfig, preset: str = "demo") -> list[Path]:
    """Generate every ``synthetic:DIR`` dataset of `config` that does not exist yet."""
    from iadkit.data.synthetic import generate

    made = []
    for ds in config.datasets:
        scheme, _, location = ds.source.partition(":")
        if scheme == "synthetic" and location and not _has_categories(Path(location)):
            generate(location, seed=0, preset=preset, progress=True)
            made.append(Path(location))
    return made


def _has_categories(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
