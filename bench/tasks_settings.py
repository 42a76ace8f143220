"""The continual and multi-class settings measured: forgetting per method, unified vs per class.

    python bench/tasks_settings.py continual-synth     # DNE, continual_bank, STFPM / RD baselines
    python bench/tasks_settings.py continual-elpv      # ELPV mono -> poly
    python bench/tasks_settings.py multiclass-synth    # PatchCore, PaDiM, UniAD: per class vs unified
    python bench/tasks_settings.py report              # one HTML report over the databases

Each grid is an ordinary benchmark (resumable: rerun to finish it) writing
``bench/results/<grid>.db``; ``report`` writes ``bench/results/tasks-report/index.html`` per
database and prints the numbers the README quotes. The synthetic set is generated once into
``bench/results/synth-tasks`` (5 categories, 128 px, 30 good training images, 12 good and 5
per defect type test images per category).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYNTH = RESULTS / "synth-tasks"
CATEGORIES = ["fabric", "metal", "wood", "washer", "label"]

BASE = {"image_size": 128, "batch_size": 16, "device": "cpu", "gallery_size": 2, "seeds": [0]}

GRIDS = {
    "continual-synth": {
        "name": "continual-synth",
        "methods": [
            "dne",
            "continual_bank",
            {"name": "stfpm", "params": {"epochs": 30}},
            {"name": "stfpm", "params": {"epochs": 80}},
            {"name": "reverse_distillation", "params": {"epochs": 30}},
        ],
        "datasets": [{"source": f"synthetic:{SYNTH}", "categories": CATEGORIES}],
        "settings": ["continual"],
    },
    "continual-elpv": {
        "name": "continual-elpv",
        "methods": ["dne", "continual_bank", {"name": "stfpm", "params": {"epochs": 30}}],
        "datasets": [{"source": "elpv", "categories": ["mono", "poly"], "subsample": {"train": 100, "test": 120}}],
        "settings": ["continual"],
    },
    "multiclass-synth": {
        "name": "multiclass-synth",
        "methods": ["patchcore", "padim", "uniad"],
        "datasets": [{"source": f"synthetic:{SYNTH}", "categories": CATEGORIES}],
        "settings": ["vanilla", "multi_class"],
    },
}


def ensure_synthetic() -> None:
    from iadkit.data.synthetic import generate

    if not (SYNTH / "synthetic.json").exists():
        generate(SYNTH, seed=0, preset="small", image_size=128, n_train=30, n_test_good=12, n_test_per_defect=5)


def run(grid: str) -> None:
    from iadkit.bench import BenchConfig, run_benchmark

    ensure_synthetic()
    cfg = BenchConfig.parse({**BASE, **GRIDS[grid]})
    summary = run_benchmark(cfg, RESULTS / f"{grid}.db", progress=True)
    print(f"{grid}: {summary.ran} ran, {summary.skipped} skipped, {len(summary.failed)} failed")
    for f in summary.failed:
        print("  failed:", f.cell.describe(), f.error)


def report() -> None:
    from iadkit.bench import ResultsDB, write_report
    from iadkit.bench.summary import task_summaries, unified_comparisons

    for grid in GRIDS:
        path = RESULTS / f"{grid}.db"
        if not path.exists():
            continue
        print(f"\n== {grid}  ({write_report(path, RESULTS / f'{grid}-report')})")
        with ResultsDB(path, writable=False) as db:
            runs = db.runs()
            for s in task_summaries(db, runs):
                if s.setting == "multi_class":
                    continue
                fm = {k: round(v, 3) for k, v in s.forgetting.items() if k in ("image_auroc", "pixel_auroc")}
                final = {k: round(v, 3) for k, v in s.final_mean.items() if k in ("image_auroc", "pixel_auroc")}
                print(f"{s.method:24s} final {final}  FM {fm}  [{s.training}]")
                print("  I-AUROC matrix (rows: after task l):")
                for row in s.matrix.metric("image_auroc"):
                    print("   ", " ".join("  -  " if v != v else f"{v:.3f}" for v in row))
            for c in unified_comparisons(db, runs):
                print(f"{c.method}: mAD per class {c.per_class_mad:.3f}, unified {c.unified_mad:.3f}")
                for k in ("image_auroc", "pixel_auroc", "aupro"):
                    per = " ".join(f"{cat}={c.per_class[k][cat]:.3f}/{c.unified[k][cat]:.3f}" for cat in c.categories)
                    print(f"  {k} per-class/unified: {per}; mean {c.per_class_mean[k]:.3f}/{c.unified_mean[k]:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    what = sys.argv[1] if len(sys.argv) > 1 else "report"
    if what == "report":
        report()
    else:
        run(what)
