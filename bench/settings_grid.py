"""The three data settings measured on the synthetic categories and ELPV (issue 11).

    python bench/settings_grid.py            # run (resumable) and print the curves' numbers
    python bench/settings_grid.py --report   # print only, from the database

One results database, three grids written into it, so that one report draws the survey's
three curves (metric against the setting's parameter, a line per method, vanilla dashed):

- noisy (ratio 0, 0.1, 0.2, 0.3): PatchCore, PaDiM, SoftPatch — does SoftPatch degrade less?
- few-shot (k = 1, 2, 4, 8 good images): PatchCore, PaDiM, RegAD — does AUROC rise with k?
- semi-supervised (k = 1, 4, 8 labelled defects): DevNet, DRA, and PatchCore trained on the
  good images only for reference — do the supervised methods improve with k?

Sizes are CPU-sized (96 px, the demo's schedules for RegAD / DevNet / DRA; ELPV mono
subsampled to 100 training and 160 test images), so the figures compare methods and trends,
not the papers' absolute numbers. Results: ``bench/results/settings.db`` and
``bench/results/settings-report/index.html``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYNTH = RESULTS / "synth-settings"
DB = RESULTS / "settings.db"

SEMI = {"epochs": 5, "steps_per_epoch": 20, "batch_size": 16, "lr": 1e-3, "finetune_from": "blocks.6"}
REGAD = {"meta_epochs": 1, "meta_shots": 2, "meta_images_per_category": 8}
DATASETS = [
    {"source": f"synthetic:{SYNTH}"},
    {"source": "elpv", "categories": ["mono"], "subsample": {"train": 100, "test": 160}},
]
BASE = {"image_size": 96, "batch_size": 16, "seeds": [0], "gallery_size": 0, "datasets": DATASETS}

GRIDS = [
    {
        "name": "settings-noisy",
        "methods": ["patchcore", "padim", "softpatch"],
        "settings": ["vanilla", {"noisy": {"ratio": [0.1, 0.2, 0.3]}}],
    },
    {
        "name": "settings-few-shot",
        "methods": ["patchcore", "padim", {"name": "regad", "params": REGAD}],
        "settings": [{"few_shot": {"k": [1, 2, 4, 8]}}],
    },
    {
        "name": "settings-semi",
        "methods": [{"name": "devnet", "params": SEMI}, {"name": "dra", "params": SEMI}],
        "settings": [{"semi_supervised": {"k": [1, 4, 8]}}],
    },
]


def run() -> None:
    from iadkit.bench import BenchConfig, run_benchmark
    from iadkit.data.synthetic import generate

    if not (SYNTH / "synthetic.json").exists():
        generate(SYNTH, seed=0, preset="demo")
    for grid in GRIDS:
        summary = run_benchmark(BenchConfig.parse({**BASE, **grid}), DB, progress=True)
        print(f"{grid['name']}: {summary.ran} ran, {summary.skipped} skipped, {len(summary.failed)} failed")
        for f in summary.failed:
            print("  failed:", f.cell.describe(), f.error)


def report() -> None:
    from iadkit.bench import ResultsDB, write_report

    print("report:", write_report(DB, RESULTS / "settings-report"))
    table: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    with ResultsDB(DB, writable=False) as db:
        for r in db.runs("done"):
            value = ",".join(f"{k}={v}" for k, v in sorted((r["setting_params"] or {}).items()))
            dataset = "elpv" if r["dataset"] == "elpv" else "synthetic"
            table[(r["method"], r["setting"] + (f"[{value}]" if value else ""), dataset)].append(
                float(r["metrics"]["image_auroc"])
            )
    print(f"{'method':22s} {'setting':28s} {'synthetic (mean of 5)':>22s} {'ELPV mono':>10s}")
    for method, setting in sorted({(m, s) for m, s, _ in table}):
        syn, elpv = table.get((method, setting, "synthetic"), []), table.get((method, setting, "elpv"), [])
        fmt = lambda v: f"{sum(v) / len(v):.3f}" if v else "-"
        print(f"{method:22s} {setting:28s} {fmt(syn):>22s} {fmt(elpv):>10s}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="only print the numbers from the database")
    if not ap.parse_args().report:
        run()
    report()
