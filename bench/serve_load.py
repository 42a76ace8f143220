"""Bounded load test of `iadkit serve` on loopback: errors, latency and the server's memory.

The server runs as its own process (`iadkit serve MODEL --host 127.0.0.1 --port P`), so its
resident memory is its own. A fixed number of requests (default 200) goes out from a few
concurrent clients (threads, one keep-alive HTTP connection each), one image per request
unless ``--batch`` says more, cycling through the test images of a synthetic category. The
run stops by itself: after the last request, or at ``--deadline-s``, whichever comes first;
then the server is terminated.

Reported:
* errors: non-200 answers, exceptions, and answers that disagree with the first answer for
  the same image (the same image must always get the same score);
* latency per request, client side (p50, p90, p99, max) and throughput;
* server RSS (VmRSS from /proc) idle after loading the model, after a warm-up of
  ``--warmup`` requests from the same clients (not counted in the figures), at the middle of the run and at
  its end, plus every 10 % in between and the high-water mark (VmHWM). "Memory does not grow"
  is judged on the steady state: end minus middle must stay under ``--max-growth-mb``.

Without ``--model``, PatchCore is fitted on a generated synthetic category (the file goes to a
temporary folder). The exit status is 1 when there were errors or the memory grew.

Usage:
    python bench/serve_load.py                                  # 200 requests, 4 clients
    python bench/serve_load.py --requests 400 --clients 8 --batch 4
    python bench/serve_load.py --model fabric.iad --images ./photos
Results: a summary on stdout, JSON under bench/results/ (``--out`` to choose the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def proc_status_mb(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, category: str, image_size: int, coreset_ratio: float) -> tuple[Path, list[Path]]:
    """Fit PatchCore on a synthetic category; returns the model file and the test images."""
    import torch

    from iadkit.data import load_dataset
    from iadkit.data.synthetic import generate
    from iadkit.model import Model

    torch.manual_seed(0)
    generate(folder / "synth", categories=[category], seed=0, preset="small", image_size=image_size)
    split = load_dataset(f"synthetic:{folder / 'synth'}", category=category)
    model = Model.create("patchcore", image_size=image_size, coreset_ratio=coreset_ratio)
    model.fit(split.train, calibration_fraction=0.2, progress=False)
    path = model.save(folder / f"{category}.iad")
    return path, [Path(s.path) for s in split.test]


def start_server(model: Path, port: int, threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-c",
        "from iadkit.cli import main; main()",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_ready(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful stop
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation): the value below which q % of requests fall."""
    s = sorted(values)
    rank = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[rank - 1]


def request_files(payloads: list[tuple[str, bytes]], i: int, batch: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart files of request i: the next `batch` images, cycling."""
    picked = [payloads[(i * batch + k) % len(payloads)] for k in range(batch)]
    return [
        ("files", (name, data, "image/png" if name.endswith(".png") else "application/octet-stream"))
        for name, data in picked
    ]


def run_load(
    base: str, payloads: list[tuple[str, bytes]], args: argparse.Namespace, server_pid: int, n: int
) -> dict[str, Any]:
    """`n` requests from `args.clients` threads; latencies, errors and RSS every n/10 requests."""
    import httpx

    lock = threading.Lock()
    next_index = 0
    done = 0
    latencies: list[float] = []
    errors: list[str] = []
    first_scores: dict[str, float] = {}
    rss_marks: list[tuple[int, float]] = []
    mark_every = max(1, n // 10)
    deadline = time.monotonic() + args.deadline_s

    def client() -> None:
        nonlocal next_index, done
        with httpx.Client(base_url=base, timeout=args.request_timeout_s) as http:
            while time.monotonic() < deadline:
                with lock:
                    if next_index >= n:
                        return
                    i = next_index
                    next_index += 1
                files = request_files(payloads, i, args.batch)
                t0 = time.perf_counter()
                try:
                    r = http.post("/predict", files=files)
                    elapsed = time.perf_counter() - t0
                    problem = None if r.status_code == 200 else f"request {i}: HTTP {r.status_code} {r.text[:200]}"
                    results = r.json()["results"] if problem is None else []
                except Exception as exc:
                    elapsed, problem, results = (
                        time.perf_counter() - t0,
                        f"request {i}: {type(exc).__name__}: {exc}",
                        [],
                    )
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)
                    for (_, (name, _, _)), res in zip(files, results):
                        if first_scores.setdefault(name, res["score"]) != res["score"]:
                            errors.append(f"request {i}: {name} scored {res['score']} after {first_scores[name]}")
                    done += 1
                    if done % mark_every == 0:
                        rss_marks.append((done, proc_status_mb(server_pid, "VmRSS")))

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    if done < n:
        errors.append(f"deadline of {args.deadline_s} s reached after {done} of {n} requests")
    return {"latencies": latencies, "errors": errors, "rss_marks": rss_marks, "wall_s": wall, "done": done}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model file; default: PatchCore fitted on a synthetic category")
    ap.add_argument("--images", type=Path, help="folder of images to send (default: the synthetic test images)")
    ap.add_argument("--category", default="metal")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1, help="images per request")
    ap.add_argument("--warmup", type=int, default=20, help="requests before measuring (same clients and shape)")
    ap.add_argument("--server-threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--deadline-s", type=float, default=900.0, help="the load stops here whatever is left")
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--max-growth-mb", type=float, default=20.0, help="allowed RSS growth from middle to end")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if min(args.requests, args.clients, args.batch) < 1:
        ap.error("--requests, --clients and --batch must be at least 1")

    import httpx

    with tempfile.TemporaryDirectory(prefix="iadkit-serve-load-") as tmp:
        if args.model is None:
            t0 = time.perf_counter()
            model, test_images = make_model(Path(tmp), args.category, args.image_size, args.coreset_ratio)
            print(
                f"fitted PatchCore on synthetic {args.category} at {args.image_size} px in {time.perf_counter() - t0:.1f} s"
            )
        else:
            model, test_images = args.model, []
        if args.images is not None:
            test_images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not test_images:
            ap.error("no images to send: give --images with --model")
        # distinct names: the synthetic set reuses 000.png in every defect folder
        payloads = [(f"{i:03d}_{p.name}", p.read_bytes()) for i, p in enumerate(test_images)]

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(model, port, args.server_threads)
        try:
            wait_ready(base, server, timeout_s=120)
            rss_idle = proc_status_mb(server.pid, "VmRSS")
            # warm-up: same clients and request shape as the load, so the server's worker
            # threads and their allocator arenas exist before the memory is watched
            warm = run_load(base, payloads, args, server.pid, n=args.warmup)
            if warm["errors"]:
                raise RuntimeError(f"warm-up failed: {warm['errors'][:3]}")
            rss_warm = proc_status_mb(server.pid, "VmRSS")
            load = run_load(base, payloads, args, server.pid, n=args.requests)
            rss_end = proc_status_mb(server.pid, "VmRSS")
            hwm = proc_status_mb(server.pid, "VmHWM")
            model_info = httpx.get(base + "/models").json()[0]
        finally:
            stop_server(server)

    lat_ms = [x * 1000 for x in load["latencies"]]
    marks = load["rss_marks"]
    middle = min(marks, key=lambda m: abs(m[0] - args.requests / 2))[1] if marks else rss_warm
    growth = rss_end - middle
    summary = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "model": {k: model_info[k] for k in ("method", "input_size", "threshold")},
        "requests": args.requests,
        "completed": load["done"],
        "clients": args.clients,
        "images_per_request": args.batch,
        "server_threads": args.server_threads,
        "errors": len(load["errors"]),
        "error_samples": load["errors"][:10],
        "wall_s": round(load["wall_s"], 2),
        "requests_per_s": round(load["done"] / load["wall_s"], 2) if load["wall_s"] else None,
        "latency_ms": {
            "p50": round(percentile(lat_ms, 50), 1),
            "p90": round(percentile(lat_ms, 90), 1),
            "p99": round(percentile(lat_ms, 99), 1),
            "max": round(max(lat_ms), 1),
            "mean": round(statistics.fmean(lat_ms), 1),
        }
        if lat_ms
        else None,
        "rss_mb": {
            "idle": round(rss_idle, 1),
            "after_warmup": round(rss_warm, 1),
            "middle": round(middle, 1),
            "end": round(rss_end, 1),
            "peak_vmhwm": round(hwm, 1),
            "every_10pct": [[k, round(v, 1)] for k, v in marks],
        },
        "rss_growth_middle_to_end_mb": round(growth, 1),
        "max_growth_mb": args.max_growth_mb,
    }
    out = args.out or HERE / "results" / f"serve_load-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(summary, indent=1))
    os.replace(tmp_out, out)

    lat = summary["latency_ms"] or {}
    rss = summary["rss_mb"]
    print(
        f"{load['done']}/{args.requests} requests, {args.clients} clients, {args.batch} image(s) each, "
        f"{summary['model']['method']} at {summary['model']['input_size']}: {summary['errors']} errors, "
        f"{summary['requests_per_s']} req/s\n"
        f"latency ms  p50 {lat.get('p50')}  p90 {lat.get('p90')}  p99 {lat.get('p99')}  max {lat.get('max')}\n"
        f"server RSS MiB  idle {rss['idle']}  after warm-up {rss['after_warmup']}  middle {rss['middle']}  "
        f"end {rss['end']}  peak {rss['peak_vmhwm']}  (growth middle->end {summary['rss_growth_middle_to_end_mb']:+})\n"
        f"RSS every 10 %: {' '.join(f'{v:.0f}' for _, v in marks)}\n"
        f"results: {out}"
    )
    for e in load["errors"][:10]:
        print("  error:", e)
    return 1 if load["errors"] or growth > args.max_growth_mb else 0


if __name__ == "__main__":
    sys.exit(main())
