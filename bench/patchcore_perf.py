"""PatchCore performance on ELPV: iadkit against anomalib 2.7.0, side by side, on this CPU.

What is measured, per (implementation, category, coreset ratio), each in a fresh subprocess so
that peak memory belongs to that run alone:

* fit seconds — `Model.fit` on the good training cells: decoding, preprocessing, features,
  coreset (anomalib: feature extraction over the same tensors + its `subsample_embedding`);
* predict images/s end to end — the IM-IAD definition: the whole loop over the test set
  (preprocessing, model, post-processing) / number of images (`iadkit.evaluation.evaluate`);
* feature-path images/s — backbone + patch embedding alone on preprocessed batches, and its
  share of the end-to-end predict time;
* peak RSS (MiB) — the process's high-water mark over fit and predict (VmHWM);
* image AUROC (with mono and poly broken out for category "all").
At coreset 0.1 it also reports the exact-search bound (feature-path FLOPs + 2 x patches x bank
x dim multiply-adds per image, at the given GFLOP/s) and the approximate-search options (faiss
IVF and HNSW) with their AUROC.

anomalib runs when bench/.anomalib-venv exists (`bash bench/anomalib_env.sh`), with
pre_trained=False and the same EfficientNet-Lite0 weights mapped into timm's
tf_efficientnet_lite0, on the same preprocessed pixels, at coreset 0.001 only (0.1 takes
hours). It uses anomalib's torch model (`PatchcoreModel`) directly, without Lightning.

Usage:
    python bench/patchcore_perf.py                        # all, ratios 0.1 and 0.001 (+ anomalib)
    python bench/patchcore_perf.py --categories all mono poly --ratios 0.1
    python bench/patchcore_perf.py --limit 64 --ratios 0.01 --no-anomalib     # smoke run
Results: one table on stdout, JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iadkit.metrics.efficiency import high_water_mark_mb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ANOMALIB_PY = HERE / ".anomalib-venv" / "bin" / "python"
IMAGE_SIZE = 224
LAYERS = ("blocks.2", "blocks.4")


def gemm_gflops(threads: int) -> float:
    """Measured float32 matrix-product rate of this machine (GFLOP/s), for the search bound."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(4):
        a @ b
    return 4 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


# -- iadkit worker -----------------------------------------------------------------------------------
def run_iadkit(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    from iadkit.data import load_dataset
    from iadkit.data.transforms import ImageSet
    from iadkit.evaluation import evaluate
    from iadkit.metrics.image import image_auroc
    from iadkit.model import Model

    split = load_dataset("elpv", category=cfg["category"])
    train, test = split.train, split.test
    if cfg.get("limit"):
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.permutation(len(train))[: cfg["limit"]])]
        test = [test[i] for i in sorted(rng.permutation(len(test))[: cfg["limit"]])]
    params = dict(cfg.get("params", {}))
    model = Model.create("patchcore", image_size=IMAGE_SIZE, coreset_ratio=cfg["ratio"], **params)
    det = model.detector

    # Warm-up outside the timings: one-time ONNX export (cached on disk) and oneDNN kernels.
    t = time.perf_counter()
    with torch.inference_mode():
        det.embed(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    warmup_s = time.perf_counter() - t

    t = time.perf_counter()
    model.fit(train, progress=False)
    fit_s = time.perf_counter() - t
    fit_peak = high_water_mark_mb()

    res = evaluate(model, test, batch_size=cfg["batch_size"])
    peak = max(fit_peak, high_water_mark_mb(), float(res.timings.get("peak_rss_mb") or 0.0))
    labels = np.array([s.label for s in test])
    out: dict[str, Any] = {
        "impl": "iadkit",
        "category": cfg["category"],
        "ratio": cfg["ratio"],
        "runtime": det.feature_runtime,
        "search": det.search,
        "n_train": len(train),
        "n_test": len(test),
        "bank_size": int(det.memory_bank.shape[0]),
        "dim": int(det.memory_bank.shape[1]),
        "fit_s": fit_s,
        "warmup_s": warmup_s,
        "predict_img_s": res.timings["images_per_second"],
        "image_auroc": res.metrics.get("image_auroc"),
        "peak_rss_mb": peak,
        "fit_info": {k: (list(v) if isinstance(v, tuple) else v) for k, v in det.fit_info_.items()},
    }
    if cfg["category"] == "all":
        types = np.array(["/mono/" in s.path for s in test])
        for name, mask in (("mono", types), ("poly", ~types)):
            if len(set(labels[mask])) == 2:
                out[f"image_auroc_{name}_of_all"] = image_auroc(labels[mask], res.scores[mask])

    # Feature path alone (backbone + patch embedding) on already preprocessed batches.
    ds = ImageSet(test[: 4 * cfg["batch_size"]], model.preprocess, cache=False)
    batches = [b.images for b in ds.batches(cfg["batch_size"])]
    with torch.inference_mode():
        det.embed(batches[0])
        t = time.perf_counter()
        for x in batches:
            det.embed(x)
        feat_s = time.perf_counter() - t
    n_feat = sum(int(x.shape[0]) for x in batches)
    out["features_img_s"] = n_feat / feat_s
    out["features_share_of_predict"] = (feat_s / n_feat) / (1.0 / out["predict_img_s"])

    # FLOPs of the feature path (torch graph) and the exact-search bound.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        feats = det._path.torch_forward(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    feat_flops = float(fc.get_total_flops())
    patches = int(feats.shape[-2] * feats.shape[-1])
    search_flops = 2.0 * patches * out["bank_size"] * out["dim"]
    out["feature_gflop_per_img"] = feat_flops / 1e9
    out["search_gflop_per_img"] = search_flops / 1e9
    out["gemm_gflops_measured"] = gemm_gflops(cfg["threads"])
    for rate, key in (
        (cfg["peak_gflops"], "bound_img_s_at_ref"),
        (out["gemm_gflops_measured"], "bound_img_s_at_measured"),
    ):
        out[key] = rate * 1e9 / (feat_flops + search_flops)

    # Approximate nearest-neighbour search, same model.
    if cfg.get("approx"):
        out["approx"] = {}
        for method in cfg["approx"]:
            det.search = method
            t = time.perf_counter()
            det.nn_index()
            build_s = time.perf_counter() - t
            r = evaluate(model, test, batch_size=cfg["batch_size"])
            out["approx"][method] = {
                "index_build_s": build_s,
                "predict_img_s": r.timings["images_per_second"],
                "image_auroc": r.metrics.get("image_auroc"),
                "peak_rss_mb": max(high_water_mark_mb(), float(r.timings.get("peak_rss_mb") or 0.0)),
            }
        det.search = "exact"
        out["peak_rss_mb_with_approx"] = max(peak, *(v["peak_rss_mb"] for v in out["approx"].values()))
    return out


# -- anomalib worker (runs in bench/.anomalib-venv) --------------------------------------------------
ANOMALIB_WORKER = r"""
import json, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from sklearn.metrics import roc_auc_score

def high_water_mark_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0

data = np.load(cfg["data"])
mean, std = cfg["mean"], cfg["std"]
size = cfg["image_size"]

def preprocess(arr):  # the same steps as iadkit.data.transforms.Preprocess for HxW uint8 images
    x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1); s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s

model = PatchcoreModel(layers=cfg["layers"], backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=9)
fx = model.feature_extractor.feature_extractor
missing, unexpected = fx.load_state_dict(load_file(cfg["weights"]), strict=False)
assert not missing, f"weights do not cover anomalib's extractor: {missing[:5]}"
bs = cfg["batch_size"]
t = time.perf_counter()
model.train()
train = data["train"]
with torch.no_grad():
    for s in range(0, len(train), bs):
        model(preprocess(train[s:s + bs]))
    n_patches = int(model.memory_bank.shape[0])
    model.subsample_embedding(cfg["ratio"])
fit_s = time.perf_counter() - t
model.eval()
test, labels = data["test"], data["labels"]
scores = []
t = time.perf_counter()
with torch.no_grad():
    for s in range(0, len(test), bs):
        out = model(preprocess(test[s:s + bs]))
        scores.append(out.pred_score.reshape(-1).numpy())
pred_s = time.perf_counter() - t
scores = np.concatenate(scores)
res = {"impl": "anomalib", "fit_s": fit_s, "predict_img_s": len(test) / pred_s,
       "image_auroc": float(roc_auc_score(labels, scores)), "peak_rss_mb": high_water_mark_mb(),
       "bank_size": int(model.memory_bank.shape[0]), "dim": int(model.memory_bank.shape[1]),
       "n_patches": n_patches}
if "types" in data.files:
    types = data["types"]
    for name, mask in (("mono", types == 0), ("poly", types == 1)):
        res[f"image_auroc_{name}_of_all"] = float(roc_auc_score(labels[mask], scores[mask]))
print("RESULT " + json.dumps(res))
"""


def prepare_anomalib_inputs(category: str, workdir: Path, limit: int | None) -> dict[str, Any]:
    """Write the split's pixels and the Lite0 weights (timm naming) for the anomalib subprocess."""
    import numpy as np
    from safetensors.torch import save_file

    from iadkit.backbones import backbone_info, classifier
    from iadkit.data import load_dataset

    split = load_dataset("elpv", category=category)
    train, test = split.train, split.test
    if limit:
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.permutation(len(train))[:limit])]
        test = [test[i] for i in sorted(rng.permutation(len(test))[:limit])]
    arrays = {
        "train": np.stack([s.load_image()[:, :, 0] for s in train]),
        "test": np.stack([s.load_image()[:, :, 0] for s in test]),
        "labels": np.array([s.label for s in test]),
    }
    if category == "all":
        arrays["types"] = np.array([0 if "/mono/" in s.path else 1 for s in test])
    data = workdir / f"elpv_{category}.npz"
    np.savez(data, **arrays)
    weights = workdir / "tf_efficientnet_lite0.safetensors"
    if not weights.exists():
        sd = {k: v.contiguous() for k, v in classifier("efficientnet_lite0").state_dict().items()}
        save_file(sd, str(weights))
    info = backbone_info("efficientnet_lite0")
    return {"data": str(data), "weights": str(weights), "mean": list(info.mean), "std": list(info.std)}


# -- driver --------------------------------------------------------------------------------------------
def spawn(cfg: dict[str, Any], python: str, code: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONUNBUFFERED="1")
    if code is None:
        cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    else:
        cmd = [python, "-c", code, json.dumps(cfg)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", **{k: cfg[k] for k in ("category", "ratio")}}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = time.perf_counter() - t
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:], **{k: cfg[k] for k in ("category", "ratio")}}


def fmt(v: Any, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "—".rjust(width) if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'impl':9} {'cat':5} {'coreset':>7} {'bank':>7} {'dim':>4} {'fit s':>7} {'pred img/s':>10} "
        f"{'feat img/s':>10} {'feat %':>6} {'RSS MiB':>8} {'AUROC':>6}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r.get('impl', '?'):9} {r.get('category', '?'):5} {r.get('ratio', 0):7g}  ERROR {r['error'][-300:]}"
            )
            continue
        notes = []
        if r.get("image_auroc_mono_of_all") is not None:
            notes.append(
                f"mono {r['image_auroc_mono_of_all']:.3f} / poly {r['image_auroc_poly_of_all']:.3f} within all"
            )
        if r.get("bound_img_s_at_ref") is not None and r["ratio"] >= 0.01:
            notes.append(
                f"exact-search bound {r['bound_img_s_at_ref']:.1f} img/s at ref GFLOP/s "
                f"({r['bound_img_s_at_measured']:.1f} at measured {r['gemm_gflops_measured']:.0f})"
            )
        lines.append(
            f"{r['impl']:9} {r['category']:5} {r['ratio']:7g} {r['bank_size']:7d} {r['dim']:4d} {r['fit_s']:7.1f} "
            f"{r['predict_img_s']:10.1f} {fmt(r.get('features_img_s'), '10.1f')} "
            f"{fmt(None if r.get('features_share_of_predict') is None else 100 * r['features_share_of_predict'], '6.0f')} "
            f"{r['peak_rss_mb']:8.0f} {r['image_auroc']:6.3f}  {'; '.join(notes)}"
        )
        for method, a in (r.get("approx") or {}).items():
            lines.append(
                f"{'  +' + method:9} {r['category']:5} {r['ratio']:7g} {r['bank_size']:7d} {r['dim']:4d} {'':>7} "
                f"{a['predict_img_s']:10.1f} {'':>10} {'':>6} {a['peak_rss_mb']:8.0f} {a['image_auroc']:6.3f}  "
                f"index build {a['index_build_s']:.1f} s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--categories", nargs="+", default=["all"], choices=["all", "mono", "poly"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.001])
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--approx", nargs="*", default=["ivf", "hnsw"], help="approximate searches tried at ratio >= 0.05")
    ap.add_argument("--ref-gflops", type=float, default=230.0, help="GEMM rate for the exact-search bound")
    ap.add_argument("--param", action="append", default=[], help="extra PatchCore hyper-parameter, key=JSON value")
    ap.add_argument("--limit", type=int, default=None, help="use only this many train and test images (smoke runs)")
    ap.add_argument("--no-anomalib", action="store_true")
    ap.add_argument("--only", choices=["iadkit", "anomalib"], help="run one implementation only")
    ap.add_argument("--anomalib-timeout", type=float, default=3600.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_iadkit(json.loads(args.worker))), flush=True)
        return 0

    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = json.loads(value)
    params.setdefault("feature_runtime", args.runtime)
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()
    for category in args.categories:
        for ratio in args.ratios:
            cfg = {
                "category": category,
                "ratio": ratio,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "params": params,
                "limit": args.limit,
                "peak_gflops": args.ref_gflops,
                "approx": args.approx if ratio >= 0.05 else [],
            }
            if args.only == "anomalib":
                continue
            print(f"iadkit   {category} coreset {ratio:g} ...", file=sys.stderr, flush=True)
            rows.append(spawn(cfg, sys.executable))
        if args.only == "anomalib" and not ANOMALIB_PY.exists():
            print(f"no {ANOMALIB_PY}: run bash bench/anomalib_env.sh first", file=sys.stderr)
        if not args.no_anomalib and args.only != "iadkit" and ANOMALIB_PY.exists():
            with tempfile.TemporaryDirectory() as tmp:
                inputs = prepare_anomalib_inputs(category, Path(tmp), args.limit)
                cfg = {
                    "category": category,
                    "ratio": 0.001,
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                    "layers": list(LAYERS),
                    "image_size": IMAGE_SIZE,
                    **inputs,
                }
                print(f"anomalib {category} coreset 0.001 ...", file=sys.stderr, flush=True)
                r = spawn(cfg, str(ANOMALIB_PY), ANOMALIB_WORKER, timeout=args.anomalib_timeout)
                r.update(category=category, ratio=0.001)
                rows.append(r)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "patchcore_perf",
        "created": stamp,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_start": load,
            "loadavg_at_end": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "rows": rows,
        "table": text,
    }
    path = args.out / f"patchcore_perf_{stamp}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"\nwritten {path}  (load average at start {load[0]:.2f}, end {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
