"""Trained methods side by side: iadkit against anomalib 2.7.0, same weights, layers, pixels, epochs, batch.

For each (method, data set, implementation) one fresh subprocess (so peak memory is its own):

* iadkit — through the public API only, in ONE adapter function (`iadkit_fit_evaluate`: the detector API is
  being refactored; parameter names epochs / batch_size / layers are expected to survive);
* anomalib — its torch model in bench/.anomalib-venv, trained by bench/_anomalib_trained_worker.py in a plain
  loop that reproduces the Lightning module's `training_step` and `configure_optimizers` (no Lightning),
  on the pixels iadkit's `Preprocess` produced (written once per data set to raw float32 files).

Both sides: the packaged EfficientNet-Lite0 weights (anomalib: mapped into timm's tf_efficientnet_lite0,
pretrained=False, nothing downloaded), the same layers, epochs and training batch size. Metrics are computed
for both by `iadkit.metrics.compute_all` (image AUROC; pixel AUROC and AUPRO where masks exist).

Columns: epochs, batch, fit wall and CPU seconds (CPU = user + system of the worker process, all threads),
predict images/s (iadkit: end to end through `iadkit.evaluate`, decoding + preprocessing + model + maps,
and the model-only rate; anomalib: model on preprocessed pixels read from disk), peak RSS (VmHWM of the
worker), metrics. iadkit's fit includes decoding and preprocessing the training images; anomalib's does not
(the driver did it): the driver's `prep_s` says what that costs.

Methods: stfpm, reverse_distillation, fastflow, cflow, cfa; with --with-recon also draem, ganomaly (issue
10; iadkit rows fail with "unknown method" until they exist). anomalib's reverse distillation supports
only ResNet encoders: both sides then use backbone resnet18 with the weight file of --resnet18-weights
(torchvision layout); without it the anomalib row is skipped.

Data sets: elpv:mono, elpv:poly, elpv:all (the full protocol of iadkit.load_dataset("elpv")), and
synth:<category> (fabric, metal, wood, washer, label) generated with iadkit.data.synthetic.generate
(preset "demo" unless --synth-preset) under --synth-dir.

Usage:
    python bench/trained_perf.py --methods stfpm --datasets elpv:mono synth:fabric
    python bench/trained_perf.py --limit 16 --epochs 1 --datasets synth:fabric        # smoke run
    python bench/trained_perf.py --impl anomalib --methods cfa --datasets elpv:mono
Results: one table on stdout, JSON under bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
ANOMALIB_WORKER = HERE / "_anomalib_trained_worker.py"

# Per method: iadkit's default schedule at the time of writing (both sides use it unless --epochs /
# --batch-size), the layers both sides use, and whether the method's pixels are normalised.
METHODS: dict[str, dict[str, Any]] = {
    "stfpm": {"epochs": 20, "batch_size": 32, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    "reverse_distillation": {
        "epochs": 40,
        "batch_size": 16,
        "layers": ["layer1", "layer2", "layer3"],
        "backbone": "resnet18",
    },
    "fastflow": {"epochs": 50, "batch_size": 32, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    "cflow": {"epochs": 20, "batch_size": 32, "layers": ["blocks.2", "blocks.4", "blocks.6"]},
    "cfa": {"epochs": 10, "batch_size": 4, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    # issue 10 (reconstruction family): anomalib's own pre-processing (DRAEM: [0, 1] pixels, no
    # normalisation; GANomaly: ImageNet normalisation); schedules are placeholders until iadkit has them.
    "draem": {"epochs": 50, "batch_size": 8, "layers": None, "normalise": "none"},
    "ganomaly": {"epochs": 20, "batch_size": 32, "layers": None, "normalise": "imagenet"},
}
TRAINED = ["stfpm", "reverse_distillation", "fastflow", "cflow", "cfa"]
RECON = ["draem", "ganomaly"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# == the iadkit adapter: the only code that touches iadkit's detector API ===============================
def iadkit_fit_evaluate(
    method: str, *, image_size: int, params: dict[str, Any], train: list, test: list, eval_batch_size: int
) -> dict[str, Any]:
    """Create, fit and evaluate one iadkit model; return timings and metrics.

    Public API only: ``Model.create(method, image_size=..., **params).fit(train)`` and
    ``iadkit.evaluate(model, test)``. When the detector API changes, update this function alone.
    """
    import iadkit

    model = iadkit.Model.create(method, image_size=image_size, **params)
    t0, c0 = time.perf_counter(), cpu_seconds()
    model.fit(train, progress=False)
    fit_s, fit_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    fit_peak = high_water_mark_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = iadkit.evaluate(model, test, batch_size=eval_batch_size)
    pred_cpu_s = cpu_seconds() - c0
    timings = dict(res.timings)
    return {
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "peak_rss_mb_fit": fit_peak,
        "predict_s": time.perf_counter() - t0,
        "predict_cpu_s": pred_cpu_s,
        "predict_img_s": timings.get("images_per_second"),
        "model_img_s": 1.0 / timings["model_seconds_per_image"] if timings.get("model_seconds_per_image") else None,
        "metrics": dict(res.metrics),
        "peak_rss_mb_eval": timings.get("peak_rss_mb"),
    }


# == helpers =============================================================================================


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_split(dataset: str, cfg: dict[str, Any]) -> tuple[list, list]:
    """(train, test) samples of 'elpv:<category>' or 'synth:<category>', optionally subsampled."""
    import numpy as np

    import iadkit

    kind, _, category = dataset.partition(":")
    if kind == "elpv":
        split = iadkit.load_dataset("elpv", category=category)
    elif kind == "synth":
        from iadkit.data.synthetic import generate

        generate(cfg["synth_dir"], preset=cfg["synth_preset"], categories=[category])
        split = iadkit.load_dataset(f"synthetic:{cfg['synth_dir']}", category=category)
    else:
        raise SystemExit(f"unknown data set {dataset!r}: use elpv:<mono|poly|all> or synth:<category>")
    train, test = list(split.train), list(split.test)
    if cfg.get("limit"):
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.permutation(len(train))[: cfg["limit"]])]
        # keep both classes in a limited test set
        good = [s for s in test if s.label == 0]
        bad = [s for s in test if s.label == 1]
        half = max(1, cfg["limit"] // 2)
        test = good[:half] + bad[:half]
    return train, test


def method_params(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Hyper-parameters given to iadkit (and the schedule the anomalib side copies)."""
    spec = METHODS[method]
    params: dict[str, Any] = {
        "epochs": args.epochs if args.epochs else spec["epochs"],
        "batch_size": args.batch_size if args.batch_size else spec["batch_size"],
    }
    if spec.get("layers"):
        params["layers"] = list(spec["layers"])
    if method == "reverse_distillation":
        params["backbone"] = "resnet18"
        params["weights_path"] = args.resnet18_weights
    return params


def pixel_normalisation(method: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the method's pixels are normalised with (the same numbers iadkit's Model.create picks)."""
    from iadkit.backbones import backbone_info

    norm = METHODS[method].get("normalise")
    if norm == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if norm == "imagenet" or METHODS[method].get("backbone") == "resnet18":
        return IMAGENET
    info = backbone_info("efficientnet_lite0")
    return tuple(info.mean), tuple(info.std)


def write_pixels(samples: list, preprocess: Any, path: Path) -> float:
    """Stream the preprocessed [3, H, W] float32 images into a raw file; returns seconds."""
    import numpy as np

    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for s in samples:
            f.write(np.ascontiguousarray(preprocess(s.load_image()).numpy(), dtype=np.float32).tobytes())
    os.replace(tmp, path)
    return time.perf_counter() - t0


def test_masks(samples: list, preprocess: Any) -> Any:
    """Ground-truth masks in the model's input geometry (as iadkit.evaluate builds them), or None."""
    import numpy as np

    if not any(s.label == 1 for s in samples) or not all(s.label == 0 or s.has_mask for s in samples):
        return None
    masks = []
    for s in samples:
        m = s.load_mask() if s.has_mask else None
        masks.append(np.zeros(preprocess.output_size, dtype=bool) if m is None else preprocess.mask(m).numpy())
    return np.stack(masks)


# == workers =============================================================================================
def run_iadkit(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    train, test = load_split(cfg["dataset"], cfg)
    out = iadkit_fit_evaluate(
        cfg["method"],
        image_size=cfg["image_size"],
        params=cfg["params"],
        train=train,
        test=test,
        eval_batch_size=cfg["eval_batch_size"],
    )
    out.update(
        impl="iadkit",
        n_train=len(train),
        n_test=len(test),
        peak_rss_mb=max(high_water_mark_mb(), out.get("peak_rss_mb_eval") or 0.0),
    )
    return out


def spawn(
    cmd: list[str], env_threads: int, timeout: float | None, env_extra: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """Run one worker; its ``RESULT {json}`` line, or {"error"} / {"skipped"} with the reason."""
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), MKL_NUM_THREADS=str(env_threads), PYTHONUNBUFFERED="1")
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = time.perf_counter() - t
            return result
    text = proc.stderr or proc.stdout
    if "SKIP " in text:
        return {"skipped": text[text.index("SKIP ") + 5 :].strip().splitlines()[0]}
    return {"error": text[-2500:]}


def run_anomalib(
    method: str, dataset: str, args: argparse.Namespace, cache: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """Prepare the pixels (once per data set and normalisation), run the worker, score with iadkit.metrics."""
    import numpy as np

    from iadkit.data.transforms import Preprocess
    from iadkit.metrics import compute_all

    mean, std = pixel_normalisation(method)
    key = (dataset, args.image_size, mean, std)
    if key not in cache:
        train, test = load_split(dataset, vars(args))
        pre = Preprocess(image_size=args.image_size, mean=mean, std=std)
        d = workdir / f"px{len(cache)}"
        d.mkdir()
        prep_s = write_pixels(train, pre, d / "train.f32") + write_pixels(test, pre, d / "test.f32")
        cache[key] = {
            "dir": d,
            "labels": np.array([s.label for s in test]),
            "masks": test_masks(test, pre),
            "prep_s": prep_s,
            "shape": [3, *pre.output_size],
        }
    px = cache[key]
    out_dir = Path(tempfile.mkdtemp(dir=workdir))
    params = method_params(method, args)
    cfg = {
        "method": method,
        "train": str(px["dir"] / "train.f32"),
        "test": str(px["dir"] / "test.f32"),
        "shape": px["shape"],
        "image_size": args.image_size,
        "layers": params.get("layers"),
        "epochs": params["epochs"],
        "batch_size": params["batch_size"],
        "eval_batch_size": args.eval_batch_size,
        "threads": args.threads,
        "seed": args.seed,
        "weights": str(lite0_weights(workdir)),
        "resnet18_weights": args.resnet18_weights,
        "dtd_dir": args.dtd_dir,
        "want_maps": px["masks"] is not None,
        "out_dir": str(out_dir),
    }
    r = spawn(
        [str(ANOMALIB_PY), str(ANOMALIB_WORKER), json.dumps(cfg)], args.threads, args.timeout, {"PYTHONPATH": None}
    )
    if "error" in r or "skipped" in r:
        return r
    scores = np.load(out_dir / "scores.npy")
    maps = np.load(out_dir / "maps.npy") if (out_dir / "maps.npy").exists() else None
    with_pixels = px["masks"] is not None and maps is not None
    r["metrics"] = compute_all(
        px["labels"], scores, masks=px["masks"] if with_pixels else None, maps=maps if with_pixels else None
    )
    r["prep_s"] = px["prep_s"]
    return r


def lite0_weights(workdir: Path) -> Path:
    """iadkit's packaged EfficientNet-Lite0 weights, saved with timm's tf_efficientnet_lite0 names."""
    path = workdir / "tf_efficientnet_lite0.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        from iadkit.backbones import classifier

        save_file({k: v.contiguous() for k, v in classifier("efficientnet_lite0").state_dict().items()}, str(path))
    return path


# == report ==============================================================================================
def fmt(v: Any, spec: str) -> str:
    width = int(spec.split(".")[0].rstrip("dfs") or 0)
    return "—".rjust(width) if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':20} {'impl':8} {'dataset':12} {'ep':>3} {'bs':>3} {'steps':>6} {'fit s':>7} {'fit cpu':>7} "
        f"{'img/s':>6} {'model':>6} {'RSS MB':>7} {'I-AUROC':>7} {'P-AUROC':>7} {'AUPRO':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['method']:20} {r['impl']:8} {r['dataset']:12} {r['epochs']:3d} {r['batch_size']:3d}"
        if "error" in r or "skipped" in r:
            why = r.get("skipped") or r["error"].strip().splitlines()[-1][-160:]
            lines.append(f"{lead}  {'SKIPPED' if 'skipped' in r else 'ERROR'}: {why}")
            continue
        m = r.get("metrics", {})
        lines.append(
            f"{lead} {fmt(r.get('optimizer_steps'), '6d')} {r['fit_s']:7.1f} {r['fit_cpu_s']:7.1f} "
            f"{fmt(r.get('predict_img_s'), '6.1f')} {fmt(r.get('model_img_s'), '6.1f')} {r['peak_rss_mb']:7.0f} "
            f"{fmt(m.get('image_auroc'), '7.3f')} {fmt(m.get('pixel_auroc'), '7.3f')} {fmt(m.get('aupro'), '6.3f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=TRAINED, choices=list(METHODS))
    ap.add_argument("--with-recon", action="store_true", help="also DRAEM and GANomaly (issue 10)")
    ap.add_argument("--datasets", nargs="+", default=["elpv:mono", "synth:fabric"])
    ap.add_argument("--impl", choices=["both", "iadkit", "anomalib"], default="both")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=None, help="override every method's epochs (both sides)")
    ap.add_argument("--batch-size", type=int, default=None, help="override every method's training batch (both sides)")
    ap.add_argument("--eval-batch-size", type=int, default=32, help="test batch (anomalib's default eval batch is 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--limit", type=int, default=None, help="at most this many train images and test images (smoke runs)"
    )
    ap.add_argument("--synth-dir", default=str(HERE / "results" / "synth"))
    ap.add_argument("--synth-preset", default="demo")
    ap.add_argument(
        "--resnet18-weights", default=None, help="torchvision resnet18 file (reverse distillation on both sides)"
    )
    ap.add_argument(
        "--dtd-dir", default=None, help="texture folder for anomalib's DRAEM (none: Perlin noise as texture)"
    )
    ap.add_argument("--timeout", type=float, default=4 * 3600.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_iadkit(json.loads(args.worker)), default=float), flush=True)
        return 0

    methods = list(dict.fromkeys(args.methods + (RECON if args.with_recon else [])))
    if args.impl != "iadkit" and not ANOMALIB_PY.exists():
        print(f"no {ANOMALIB_PY}: run bash bench/anomalib_env.sh first (or --impl iadkit)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"trained_perf_{stamp}.json"
    rows: list[dict[str, Any]] = []
    loads = [os.getloadavg()]
    record: dict[str, Any] = {
        "benchmark": "trained_perf",
        "created": stamp,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="trained_perf_") as tmp:
        workdir, cache = Path(tmp), {}
        for dataset in args.datasets:
            for method in methods:
                params = method_params(method, args)
                for impl in ["iadkit", "anomalib"] if args.impl == "both" else [args.impl]:
                    print(f"{impl:8} {method} {dataset} ...", file=sys.stderr, flush=True)
                    load_before = os.getloadavg()
                    if impl == "iadkit":
                        cfg = {
                            "method": method,
                            "dataset": dataset,
                            "params": params,
                            "image_size": args.image_size,
                            "threads": args.threads,
                            "eval_batch_size": args.eval_batch_size,
                            "limit": args.limit,
                            "synth_dir": args.synth_dir,
                            "synth_preset": args.synth_preset,
                        }
                        env = {"PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT / "src")}
                        if args.resnet18_weights:  # a torchvision file iadkit's lock does not list
                            env["IADKIT_ALLOW_UNLISTED_WEIGHTS"] = "1"
                        r = spawn(
                            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                            args.threads,
                            args.timeout,
                            env,
                        )
                    else:
                        r = run_anomalib(method, dataset, args, cache, workdir)
                    r.update(
                        method=method,
                        dataset=dataset,
                        impl=impl,
                        epochs=params["epochs"],
                        batch_size=params["batch_size"],
                    )
                    r["loadavg_before"], r["loadavg_after"] = load_before, os.getloadavg()
                    rows.append(r)
                    loads.append(r["loadavg_after"])
                    record["machine"]["loadavg"] = loads
                    tmp_path = path.with_suffix(".partial")
                    tmp_path.write_text(json.dumps(record, indent=2, default=float))
                    os.replace(tmp_path, path)  # results so far survive an interrupted run
                    print(table([r]).splitlines()[-1], file=sys.stderr, flush=True)
    record["table"] = table(rows)
    tmp_path = path.with_suffix(".partial")
    tmp_path.write_text(json.dumps(record, indent=2, default=float))
    os.replace(tmp_path, path)
    print(record["table"])
    print(f"\nwritten {path}  (load average 1-min: start {loads[0][0]:.2f}, end {loads[-1][0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
