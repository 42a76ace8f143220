"""Logical anomalies and 3D: EfficientAD against PatchCore on a synthetic MVTec LOCO tray, and
BTF against RGB-only PatchCore on a synthetic MVTec 3D-AD puck (issue 15).

The tray has structural defects (scratches, stains: visible in local texture) and logical ones
(a nut where a bolt belongs, a missing or extra part: every local patch looks normal); the
LOCO columns are the image AUROC per kind and AUC-sPRO at FPR 0.05. The puck has dents and
bumps that change only the geometry (the defective RGB image is byte-identical to its good
twin), a cut seen in both, and a stain seen in colour only; the table gives the image and
pixel AUROC per defect type, good images against that type's images.

    python bench/logical_3d.py                       # both grids, 128 px, results in bench/results/
    python bench/logical_3d.py --only loco --size 256
    python bench/logical_3d.py --speed               # EfficientAD vs PatchCore images/s at 256 px

Numbers come from the benchmark runner (the same cells `iadkit bench run` makes) and its
results database; this script only picks the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from iadkit.bench import BenchConfig, ResultsDB, run_benchmark, write_report
from iadkit.data.synthetic import generate
from iadkit.metrics.image import image_auroc

HERE = Path(__file__).resolve().parent


def loco_grid(data: Path, size: int) -> BenchConfig:
    return BenchConfig.parse(
        {
            "name": "loco-tray",
            "methods": ["patchcore", "efficientad"],
            "datasets": [{"source": f"synthetic:{data}", "categories": ["tray"]}],
            "seeds": [0],
            "image_size": size,
            "gallery_size": 2,
        }
    )


def puck_grid(data: Path, size: int) -> BenchConfig:
    return BenchConfig.parse(
        {
            "name": "puck-3d",
            "methods": [
                "patchcore",
                {"name": "btf", "params": {"modality": "rgb+fpfh"}},
                {"name": "btf", "params": {"modality": "fpfh"}},
                {"name": "btf", "params": {"modality": "rgb"}},
            ],
            "datasets": [{"source": f"synthetic:{data}", "categories": ["puck"], "options": {"remove_plane": True}}],
            "seeds": [0],
            "image_size": size,
            "gallery_size": 2,
        }
    )


def label_of(run: dict) -> str:
    modality = (run["params"] or {}).get("modality")
    return f"{run['method']}[{modality}]" if modality else run["method"]


def per_defect_auroc(db: ResultsDB, cell_id: str) -> dict[str, float]:
    s = db.image_scores(cell_id)
    good = s["labels"] == 0
    out = {}
    for kind in sorted({d for d, y in zip(s["defect_types"], s["labels"]) if y == 1}):
        sel = good | np.array([d == kind for d in s["defect_types"]])
        out[kind] = round(float(image_auroc(s["labels"][sel], s["scores"][sel])), 3)
    return out


def run(name: str, cfg: BenchConfig, out: Path) -> list[dict]:
    db_path = out / f"{name}.db"
    t0 = time.perf_counter()
    run_benchmark(cfg, db_path, progress=True)
    write_report(db_path, out / f"{name}-report")
    rows = []
    with ResultsDB(db_path) as db:
        for r in db.runs():
            if r["status"] != "done":
                rows.append({"method": label_of(r), "status": r["status"], "error": r.get("error")})
                continue
            m = r["metrics"]
            keep = (
                "image_auroc",
                "pixel_auroc",
                "aupro",
                "image_auroc_structural",
                "image_auroc_logical",
                "image_auroc_loco_mean",
                "auc_spro_0.05",
            )
            row = {"method": label_of(r), **{k: round(float(m[k]), 3) for k in keep if k in m}}
            row["fit_s"] = round(float(r["timings"].get("fit_seconds", float("nan"))), 1)
            if name == "puck-3d":
                row["image_auroc_per_defect"] = per_defect_auroc(db, r["cell_id"])
            rows.append(row)
    print(f"{name}: {time.perf_counter() - t0:.0f} s")
    for row in rows:
        print(json.dumps(row))
    return rows


def speed(out: Path, size: int = 256, n: int = 32) -> list[dict]:
    """Images/s of predict (end to end from files, batch 8) at `size` px on this machine's threads
    (EfficientAD's student trained 20 steps only: its predict costs the same at any training length)."""
    import torch

    from iadkit import Model, load_dataset

    data = out / "speed-data"
    if not data.exists():
        generate(data, categories=["metal"], preset="demo")
    split = load_dataset(data, category="metal")
    rows = []
    for method in ("patchcore", "efficientad"):
        # throughput does not depend on how long the student trained: a short fit suffices
        params = {"steps": 20} if method == "efficientad" else {}
        model = Model.create(method, image_size=size, **params).fit(split.train, progress=True)
        files = [s.path for s in split.test][:n]
        model.predict(files[:8], batch_size=8)  # warm-up
        t0 = time.perf_counter()
        model.predict(files, batch_size=8)
        dt = time.perf_counter() - t0
        rows.append({"method": method, "size": size, "threads": torch.get_num_threads(), "img_per_s": round(n / dt, 2)})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["loco", "puck"], default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--speed", action="store_true", help="measure images/s at 256 px instead")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "logical_3d")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        result = {"speed": speed(args.out)}
    else:
        result = {}
        if args.only in (None, "loco"):
            tray = args.out / "tray-data"
            if not tray.exists():
                generate(tray, categories=["tray"], layout="loco", preset="demo")
            result["loco"] = run("loco-tray", loco_grid(tray, args.size), args.out)
        if args.only in (None, "puck"):
            puck = args.out / "puck-data"
            if not puck.exists():
                generate(puck, categories=["puck"], layout="mvtec3d", preset="demo")
            result["puck"] = run("puck-3d", puck_grid(puck, args.size), args.out)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (args.out / f"logical_3d_{stamp}.json").write_text(json.dumps({"load": os.getloadavg(), **result}, indent=1))


if __name__ == "__main__":
    main()
