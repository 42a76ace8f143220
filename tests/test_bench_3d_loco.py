"""The benchmark passes depth to a 3D method and LOCO metrics to the report, with no other
method or setting knowing: one grid over a synthetic MVTec 3D-AD puck (BTF and a colour
method side by side) and a synthetic MVTec LOCO tray."""

from __future__ import annotations

import pytest

from iadkit.bench import BenchConfig, ResultsDB, run_benchmark, write_report
from iadkit.data.synthetic import generate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench3d")
    generate(tmp / "puck", categories=["puck"], layout="mvtec3d", n_train=8, n_test_good=3, n_test_per_defect=2)
    generate(tmp / "tray", categories=["tray"], layout="loco", n_train=8, n_test_good=3, n_test_per_defect=2)
    cfg = BenchConfig.parse(
        {
            "name": "3d-loco",
            "methods": [{"name": "btf", "params": {"coreset_ratio": 0.5}}, "test_pixel_zscore"],
            "datasets": [
                {"source": f"synthetic:{tmp / 'puck'}", "categories": ["puck"], "options": {"remove_plane": True}},
                {"source": f"synthetic:{tmp / 'tray'}", "categories": ["tray"]},
            ],
            "seeds": [0],
            "image_size": 64,
            "batch_size": 8,
            "device": "cpu",
            "gallery_size": 0,
            "imports": ["_dummy"],
        }
    )
    run_benchmark(cfg, tmp / "r.db", progress=False)
    report = write_report(tmp / "r.db", tmp / "out").read_text(encoding="utf-8")
    with ResultsDB(tmp / "r.db") as db:
        return {(r["method"], r["category"]): r for r in db.runs()}, report


def test_depth_reaches_btf_and_loco_metrics_reach_the_report(runs) -> None:
    by_cell, report = runs
    btf_puck = by_cell[("btf", "puck")]
    assert btf_puck["status"] == "done", btf_puck.get("error")
    assert btf_puck["metrics"]["image_auroc"] >= 0.0 and "pixel_auroc" in btf_puck["metrics"]
    assert by_cell[("test_pixel_zscore", "puck")]["status"] == "done"  # colour only, same samples
    # BTF on the tray has no point maps: the cell fails with the reason, the grid goes on
    assert by_cell[("btf", "tray")]["status"] == "failed" and "point map" in by_cell[("btf", "tray")]["error"]
    tray = by_cell[("test_pixel_zscore", "tray")]
    assert tray["status"] == "done"
    for key in ("image_auroc_logical", "image_auroc_structural", "image_auroc_loco_mean", "auc_spro_0.05"):
        assert 0.0 <= tray["metrics"][key] <= 1.0, key
    assert 'data-metric="image_auroc_logical"' in report and "AUC-sPRO@0.05" in report
