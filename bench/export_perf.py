"""Exported runtime vs torch: images/s, peak memory and parity per method, on real images.

For every method a model is fitted on ELPV "mono" (224 px; trained methods with one epoch on
a subset: this measures inference, not accuracy), saved and exported to ONNX. Then, each in a
fresh process (so its memory is its own, 2 threads):

* torch: ``Model.load`` + ``Model.predict`` on the test files (batch 16, the API default;
  PatchCore and PaDiM run their backbone in ONNX Runtime inside torch by default);
* runtime: ``iadkit.runtime.load`` + ``predict`` on the same files (graph batch 4, the
  runtime default), in a process that never imports torch (asserted), with its resident
  memory (VmRSS) after each stage: interpreter + numpy + Pillow, ``import onnxruntime``,
  ``import iadkit.runtime``, session creation, the first image, all images; and the
  high-water mark (VmHWM).

The runtime's scores are compared with torch's (largest absolute and relative difference).
For PatchCore (coreset 0.01, the deployment target: a runtime-only process under 500 MB)
the runtime is also run at graph batches 1, 4, 8 and 16, and with ONNX Runtime's memory arena
off, to show where memory goes.

Usage:
    python bench/export_perf.py                          # every method, 64 test images
    python bench/export_perf.py --methods patchcore padim --n-test 128
Results: a table on stdout, JSON under bench/results/ (``--out`` to choose the file). Model
files and exports are kept in ``--work`` (default: a temporary folder) and reused when present.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = 224

# Inference-relevant configuration per method: the defaults (architecture as shipped), one
# training epoch, and a training subset for the methods that train networks.
BENCH_CONFIG: dict[str, dict[str, Any]] = {
    "patchcore": {"params": {"coreset_ratio": 0.01}, "n_train": None},
    "padim": {"params": {}, "n_train": None},
    # SPADE compares each test image with the full feature pyramids of 50 retrieved training
    # images (~170 GFLOP per image at 224 px): 8 test images are enough to time it.
    "spade": {"params": {}, "n_train": 64, "n_test": 8},
    "stfpm": {"params": {"epochs": 1}, "n_train": 32},
    "reverse_distillation": {"params": {"epochs": 1}, "n_train": 32},
    "fastflow": {"params": {"epochs": 1}, "n_train": 32},
    "cflow": {"params": {"epochs": 1}, "n_train": 32},
    "cutpaste": {"params": {"epochs": 1}, "n_train": 32},
    "simplenet": {"params": {"epochs": 1}, "n_train": 32},
    "cfa": {"params": {"epochs": 1}, "n_train": 32},
}


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(field)


# -- preparation (torch) --------------------------------------------------------------------------
def prepare(work: Path, methods: list[str], n_test: int, threads: int) -> list[Path]:
    """Test images as PNG files (both runtimes read the same files); model files and exports."""
    import numpy as np
    import torch
    from PIL import Image

    import iadkit
    from iadkit.model import Model

    torch.set_num_threads(threads)
    split = iadkit.load_dataset("elpv", category="mono")
    images_dir = work / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    good = [s for s in split.test if s.label == 0][: n_test // 2]
    bad = [s for s in split.test if s.label == 1][: n_test - len(good)]
    files = []
    for i, s in enumerate(good + bad):
        path = images_dir / f"{i:04d}_{'good' if s.label == 0 else 'bad'}.png"
        if not path.exists():
            Image.fromarray(np.asarray(s.load_image())[:, :, 0]).save(path)
        files.append(path)
    for name in methods:
        model_file, onnx_file = work / f"{name}.iad", work / f"{name}.onnx"
        if model_file.exists() and onnx_file.exists():
            continue
        cfg = BENCH_CONFIG.get(name, {"params": {}, "n_train": 32})
        train = list(split.train)[: cfg["n_train"]] if cfg["n_train"] else list(split.train)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = Model.create(name, image_size=SIZE, **cfg["params"]).fit(train, progress=False)
        fit_s = time.perf_counter() - t0
        model.save(model_file)
        t0 = time.perf_counter()
        model.export_onnx(onnx_file)
        print(
            f"{name}: fit {fit_s:.1f} s on {len(train)} images, export {time.perf_counter() - t0:.1f} s, "
            f"{onnx_file.stat().st_size / 1e6:.1f} MB",
            flush=True,
        )
    return files


# -- children (each a fresh process) -------------------------------------------------------------
def child_torch(model_file: str, files: list[str], threads: int, out_scores: str) -> dict[str, Any]:
    stages = {"start": status_mb("VmRSS")}
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    stages["import torch"] = status_mb("VmRSS")
    from iadkit.model import Model

    model = Model.load(model_file)
    stages["model loaded"] = status_mb("VmRSS")
    model.predict(files[:2])  # warm-up (first ONNX Runtime feature session, caches)
    t0, c0 = time.perf_counter(), time.process_time()
    result = model.predict(files, batch_size=16)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stages["predicted"] = status_mb("VmRSS")
    np.save(out_scores, result.scores)
    return {
        "images_per_s": len(files) / seconds,
        "cpu_s_per_image": cpu / len(files),
        "stages_mb": stages,
        "peak_rss_mb": status_mb("VmHWM"),
    }


def child_runtime(
    onnx_file: str, files: list[str], threads: int, batch: int, arena: bool, ref_scores: str | None
) -> dict[str, Any]:
    import numpy as np
    from PIL import Image  # noqa: F401  (what a deployment imports anyway)

    stages = {"python + numpy + Pillow": status_mb("VmRSS")}
    import onnxruntime  # noqa: F401

    stages["import onnxruntime"] = status_mb("VmRSS")
    import iadkit.runtime as rt

    stages["import iadkit.runtime"] = status_mb("VmRSS")
    model = rt.load(onnx_file, threads=threads, batch_size=batch)
    if not arena:  # rebuild the session without the CPU memory arena
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        model.session = ort.InferenceSession(onnx_file, opts, providers=["CPUExecutionProvider"])
    stages["session created"] = status_mb("VmRSS")
    model.predict(files[:1])
    stages["first image"] = status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    result = model.predict(files, batch_size=16)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stages["all images"] = status_mb("VmRSS")
    assert "torch" not in sys.modules, "the runtime imported torch"
    out: dict[str, Any] = {
        "images_per_s": len(files) / seconds,
        "cpu_s_per_image": cpu / len(files),
        "stages_mb": stages,
        "peak_rss_mb": status_mb("VmHWM"),
        "batch": model.batch_size,
        "arena": arena,
        "torch_imported": False,
    }
    if ref_scores:
        ref = np.load(ref_scores)
        diff = np.abs(result.scores.astype(np.float64) - ref)
        out["max_abs_score_diff"] = float(diff.max())
        out["max_rel_score_diff"] = float((diff / np.maximum(np.abs(ref), 1e-12)).max())
    return out


def run_child(args: list[str], threads: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="*", default=list(BENCH_CONFIG))
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=["torch", "runtime"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--no-arena", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        files = Path(args.images).read_text().split("\n")
        if args.child == "torch":
            res = child_torch(args.file, files, args.threads, args.scores)
        else:
            res = child_runtime(args.file, files, args.threads, args.batch, not args.no_arena, args.scores)
        print(json.dumps(res))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="iadkit-export-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, args.methods, args.n_test, args.threads)
    out = args.out or HERE / "results" / f"export_perf_{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
        },
        "data": f"ELPV mono test files (300 px grayscale PNG), model input {SIZE} px",
        "config": {m: BENCH_CONFIG.get(m) for m in args.methods},
        "rows": [],
    }
    rows = record["rows"]
    for name in args.methods:
        model_file, onnx_file, scores = work / f"{name}.iad", work / f"{name}.onnx", work / f"{name}.scores.npy"
        n_test = BENCH_CONFIG.get(name, {}).get("n_test") or len(files)
        listing = work / f"images-{n_test}.txt"
        listing.write_text(
            "\n".join(
                str(f) for f in files[: n_test // 2] + files[len(files) // 2 : len(files) // 2 + n_test - n_test // 2]
            )
        )
        common = ["--images", str(listing), "--threads", str(args.threads)]
        t = run_child(["--child", "torch", "--file", str(model_file), "--scores", str(scores), *common], args.threads)
        r = run_child(["--child", "runtime", "--file", str(onnx_file), "--scores", str(scores), *common], args.threads)
        row = {"method": name, "n_test": n_test, "onnx_mb": onnx_file.stat().st_size / 1e6, "torch": t, "runtime": r}
        if name == "patchcore":
            sweep = {}
            for batch in (1, 4, 8, 16):
                sweep[f"batch {batch}"] = run_child(
                    ["--child", "runtime", "--file", str(onnx_file), "--batch", str(batch), *common], args.threads
                )
            sweep["batch 4, no arena"] = run_child(
                ["--child", "runtime", "--file", str(onnx_file), "--batch", "4", "--no-arena", *common], args.threads
            )
            row["runtime_sweep"] = sweep
            from safetensors.numpy import load_file

            bank = load_file(str(model_file))["memory_bank_"]
            row["bank"] = {"rows": int(bank.shape[0]), "dims": int(bank.shape[1]), "mb": bank.nbytes / 1e6}
        rows.append(row)
        print(
            f"{name:22s} torch {t['images_per_s']:6.2f} img/s {t.get('cpu_s_per_image', float('nan')):6.3f} cpu-s/img "
            f"{t['peak_rss_mb']:6.0f} MB | runtime {r['images_per_s']:6.2f} img/s {r.get('cpu_s_per_image', float('nan')):6.3f} cpu-s/img "
            f"{r['peak_rss_mb']:6.0f} MB | onnx {row['onnx_mb']:6.1f} MB | max |diff| {r['max_abs_score_diff']:.2e} "
            f"(rel {r['max_rel_score_diff']:.1e})",
            flush=True,
        )
        if "runtime_sweep" in row:
            for key, s in row["runtime_sweep"].items():
                print(
                    f"    patchcore runtime {key:18s} {s['images_per_s']:6.1f} img/s {s.get('cpu_s_per_image', float('nan')):6.3f} cpu-s/img "
                    f"peak {s['peak_rss_mb']:5.0f} MB  stages {s['stages_mb']}"
                )
            print(f"    bank {row['bank']}")
        out.write_text(json.dumps(record, indent=1))  # after every method: a long run keeps what it measured
    print(f"results: {out}")


if __name__ == "__main__":
    main()
