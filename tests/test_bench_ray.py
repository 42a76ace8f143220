"""The Ray executor on a private local Ray instance: same results as local, failures recorded,
sharded batch prediction equal to in-process prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_bench_support as support
from iadkit.batch import predict_folder, shard
from iadkit.bench import BenchConfig, ResultsDB, run_benchmark
from iadkit.bench.executors import ExecutorError, make_executor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """One small Ray instance for the module (starting Ray takes several seconds)."""
    # One CPU: one worker process to start (each imports torch), the slow part of this module.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_results_equal_local_results(local_ray, tmp_path):
    methods = ["test_pixel_zscore", "test_bench_seeded", "test_bench_fail"]
    cfg = BenchConfig.parse(support.grid(methods, categories=["flat"], seeds=[0, 1]))
    local = run_benchmark(cfg, tmp_path / "local.db", progress=False)
    remote = run_benchmark(cfg, tmp_path / "ray.db", executor="ray", progress=False)
    assert local.ran == remote.ran == 6 and len(remote.failed) == 2
    with ResultsDB(tmp_path / "local.db") as a, ResultsDB(tmp_path / "ray.db") as b:
        ra = {r["cell_id"]: r for r in a.runs()}
        rb = {r["cell_id"]: r for r in b.runs()}
        assert set(ra) == set(rb)
        for cid, r in ra.items():
            assert rb[cid]["status"] == r["status"]
            assert rb[cid]["metrics"] == r["metrics"]  # to the last digit: deterministic methods
            assert rb[cid]["error"] == r["error"]
            np.testing.assert_array_equal(b.image_scores(cid)["scores"], a.image_scores(cid)["scores"])
            assert [o.png for o in b.overlays(cid)] == [o.png for o in a.overlays(cid)]
    # A rerun through Ray skips everything.
    again = run_benchmark(cfg, tmp_path / "ray.db", executor="ray", progress=False)
    assert again.ran == 0 and again.skipped == 6


def _tiny_model(tmp_path):
    from iadkit.model import Model

    train, test = support._images("flat")
    model = Model.create("test_pixel_zscore", image_size=16)
    model.fit(train, progress=False)
    model.set_threshold(10.0)
    path = model.save(tmp_path / "m.iad")
    files = []
    for i, s in enumerate(test * 2):
        f = tmp_path / "imgs" / f"{i:02d}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(s.image[:, :, 0]).save(f)
        files.append(str(f))
    bad = tmp_path / "imgs" / "corrupt.png"
    bad.write_bytes(b"not a png")
    files.insert(3, str(bad))
    return path, files


def test_predict_folder_sharded_on_ray_equals_local(local_ray, tmp_path, monkeypatch):
    model_path, files = _tiny_model(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths: Ray workers run elsewhere, rows keep them as given
    files = [str(Path(f).relative_to(tmp_path)) for f in files]
    local = predict_folder(model_path, files, tmp_path / "local", overlays=False).rows
    remote = predict_folder(model_path, files, tmp_path / "ray", executor="ray", shards=3).rows  # 3 tasks on 1 worker
    assert [r["path"] for r in local] == [r["path"] for r in remote] == files
    strip = lambda rows: [{k: v for k, v in r.items() if k != "error"} for r in rows]
    assert strip(local) == strip(remote)
    bad = [r for r in remote if r["error"]]
    assert [r["path"] for r in bad] == [files[3]] and bad[0]["score"] is None
    assert "corrupt.png" in bad[0]["error"] and "corrupt.png" in local[3]["error"]
    good = [r for r in remote if not r["error"]]
    assert len(good) == len(files) - 1 and all(isinstance(r["anomalous"], bool) for r in good)
    assert any(r["anomalous"] for r in good) and not all(r["anomalous"] for r in good)


def test_shard_keeps_order_and_balance():
    parts = shard([str(i) for i in range(10)], 3)
    assert parts == [["0", "1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"]]
    assert shard(["a"], 5) == [["a"]]


def test_executor_errors():
    with pytest.raises(ExecutorError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ExecutorError, match="--executor ray"):
        make_executor("local", address="auto")
