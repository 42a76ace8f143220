"""MuSc zero-shot on the synthetic categories: image and pixel AUROC with both feature options,
and how the time per image grows with the number of images scored together.

    python bench/musc_zero_shot.py quality            # 5 categories x {efficientnet_lite0, dinov2_vits14}
    python bench/musc_zero_shot.py scaling            # fabric, N = 8, 16, 32, 44 images per batch
    python bench/musc_zero_shot.py quality --patchcore   # + PatchCore trained on the good images, for reference

No training image is used (the model is fitted on an empty set). The synthetic set is the
"demo" preset (128 px images, 20 good and 8 per defect type test images per category),
generated once into ``bench/results/synth-demo``; images are resized to 224 px (the DINOv2
graph's fixed size). Results: ``bench/results/musc-<what>.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYNTH = RESULTS / "synth-demo"
CATEGORIES = ["fabric", "metal", "wood", "washer", "label"]
BACKBONES = ["efficientnet_lite0", "dinov2_vits14"]


def _data(category: str):
    from iadkit import load_dataset
    from iadkit.data.synthetic import generate

    if not (SYNTH / "synthetic.json").exists():
        generate(SYNTH, seed=0, preset="demo")
    return load_dataset(f"synthetic:{SYNTH}", category=category)


def _evaluate(method: str, backbone: str | None, train, test) -> dict:
    from iadkit.evaluation import evaluate
    from iadkit.model import Model

    params = {"backbone": backbone} if backbone else {}
    model = Model.create(method, image_size=224, **params)
    t0 = time.perf_counter()
    model.fit(train, progress=False)
    fit_s = time.perf_counter() - t0
    ev = evaluate(model, test, batch_size=16)
    out = {k: round(float(ev.metrics[k]), 4) for k in ("image_auroc", "pixel_auroc", "aupro")}
    out.update(
        n=len(test), fit_seconds=round(fit_s, 2), seconds_per_image=round(ev.timings["model_seconds_per_image"], 4)
    )
    return out


def quality(with_patchcore: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    rows: dict = {}
    for cat in CATEGORIES:
        split = _data(cat)
        for bb in BACKBONES:
            rows[f"musc[{bb}]/{cat}"] = r = _evaluate("musc", bb, [], list(split.test))
            print(f"musc[{bb}] {cat}: {r}", flush=True)
        if with_patchcore:
            rows[f"patchcore/{cat}"] = r = _evaluate("patchcore", None, list(split.train), list(split.test))
            print(f"patchcore {cat}: {r}", flush=True)
    return rows


def scaling() -> dict:
    """Seconds per image against N, the images scored together (stratified subsets of fabric's
    test set: the same share of defective images at every N)."""
    import torch

    from iadkit.bench.datasets import subsample_test

    torch.set_num_threads(1)
    test = list(_data("fabric").test)
    rows: dict = {}
    for bb in BACKBONES:
        for n in (8, 16, 32, len(test)):
            subset = subsample_test(test, n)
            rows[f"{bb}/N={len(subset)}"] = r = _evaluate("musc", bb, [], subset)
            print(f"{bb} N={len(subset)}: {r}", flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    what = sys.argv[1] if len(sys.argv) > 1 else "quality"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = quality("--patchcore" in sys.argv) if what == "quality" else scaling()
    (RESULTS / f"musc-{what}.json").write_text(json.dumps(result, indent=1))
