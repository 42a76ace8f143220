"""Reconstruction methods against PatchCore on the synthetic categories (issue 10): image AUROC,
pixel AUROC, pixel AP and AUPRO per category at each method's default CPU schedule.

    python bench/recon_pixel.py                          # draem, autoencoder, ganomaly, patchcore at 128 px
    python bench/recon_pixel.py --methods draem patchcore --size 64

The survey's finding to check: DRAEM (reconstruction + simulated anomalies) localises better
than PatchCore by pixel AP. One benchmark grid, vanilla setting, seed 0; results database
``bench/results/recon-pixel-<size>px.db`` and its report beside it (one database per size, so
a table never mixes sizes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYNTH = RESULTS / "synth-recon"
KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["draem", "autoencoder", "ganomaly", "patchcore"])
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()

    from iadkit.bench import BenchConfig, ResultsDB, run_benchmark, write_report
    from iadkit.data.synthetic import generate

    if not (SYNTH / "synthetic.json").exists():
        generate(SYNTH, seed=0, preset="demo")
    db_path = RESULTS / f"recon-pixel-{args.size}px.db"
    cfg = BenchConfig.parse(
        {
            "name": "recon-pixel",
            "methods": args.methods,
            "datasets": [{"source": f"synthetic:{SYNTH}"}],
            "seeds": [0],
            "image_size": args.size,
            "gallery_size": 2,
        }
    )
    run_benchmark(cfg, db_path, progress=True)
    write_report(db_path, RESULTS / f"recon-pixel-{args.size}px-report")
    table: dict[str, dict[str, dict[str, float]]] = {}
    with ResultsDB(db_path, writable=False) as db:
        for r in db.runs("done"):
            table.setdefault(r["method"], {})[r["category"]] = {
                k: float(r["metrics"].get(k, float("nan"))) for k in KEYS
            }
    print(f"{'method':12s} " + " ".join(f"{k:>12s}" for k in KEYS) + "   (mean over categories; per category below)")
    for method, cats in table.items():
        means = [sum(c[k] for c in cats.values()) / len(cats) for k in KEYS]
        print(f"{method:12s} " + " ".join(f"{m:12.3f}" for m in means))
        for cat, c in cats.items():
            print(f"  {cat:10s} " + " ".join(f"{c[k]:12.3f}" for k in KEYS))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    main()
