"""evaluate() on MVTec LOCO-style test sets: per-kind image AUROC and AUC-sPRO at native size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _dummy  # noqa: F401  (registers test_pixel_zscore)
from iadkit.data.transforms import Preprocess
from iadkit.evaluation import evaluate, loco_metrics, map_to_native
from iadkit.metrics.image import image_auroc
from iadkit.metrics.spro import LOCO_FPR_LIMITS, auc_spro_by_type
from iadkit.model import Model


@pytest.fixture(scope="module")
def tray(synthetic):
    return synthetic("tray", layout="loco", n_train=8, n_test_good=4, n_test_per_defect=2)


def test_evaluate_adds_loco_kinds_and_spro_at_native_size(tray) -> None:
    model = Model.create("test_pixel_zscore", image_size=32).fit(tray.train, calibration_fraction=0.0, progress=False)
    result = evaluate(model, tray.test, keep_maps=True)
    m = result.metrics
    kinds = sorted({s.defect_type for s in tray.test} - {"good"})
    assert kinds == ["logical_anomalies", "structural_anomalies"]
    # image AUROC of each kind against the good images, and their mean
    labels, scores, types = result.labels, result.scores, result.defect_types
    for kind, key in [("logical_anomalies", "image_auroc_logical"), ("structural_anomalies", "image_auroc_structural")]:
        keep = [i for i, t in enumerate(types) if t in (kind, "good")]
        assert m[key] == pytest.approx(image_auroc(labels[keep], scores[keep]))
    assert m["image_auroc_loco_mean"] == pytest.approx((m["image_auroc_logical"] + m["image_auroc_structural"]) / 2)
    # sPRO on the 64 px masks, the 32 px maps upsampled (bilinear) to them
    native = [
        torch.nn.functional.interpolate(
            torch.from_numpy(a)[None, None], size=(64, 64), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        for a in result.maps
    ]
    expected = auc_spro_by_type(native, [s.load_regions((64, 64)) for s in tray.test], types)
    for limit in LOCO_FPR_LIMITS:
        assert m[f"auc_spro_{limit:g}"] == pytest.approx(expected["mean"][limit])
        assert m[f"auc_spro_{limit:g}_logical"] == pytest.approx(expected["logical_anomalies"][limit])
    assert m["spro_scale"] == 1.0 and 0.0 <= m["auc_spro_0.05"] <= 1.0


def test_a_perfect_map_scores_one_at_any_resolution(tray) -> None:
    test = tray.test
    maps = np.stack([s.load_mask(shape=(64, 64)).astype(np.float32) for s in test])
    labels = np.array([s.label for s in test])
    pp = Preprocess(image_size=64)
    full = loco_metrics(test, labels, maps.max(axis=(1, 2)), maps, pp)
    small = loco_metrics(test, labels, maps.max(axis=(1, 2)), maps, pp, max_pixels=len(test) * 16 * 16)
    assert full["spro_scale"] == 1.0 and small["spro_scale"] == pytest.approx(0.25)
    for out in (full, small):
        assert out["auc_spro_0.05"] == pytest.approx(1.0) and out["image_auroc_loco_mean"] == 1.0
    # image-level only (no maps): the per-kind AUROCs, no sPRO
    assert set(loco_metrics(test, labels, maps.max(axis=(1, 2)), None, pp)) == {
        "image_auroc_logical",
        "image_auroc_structural",
        "image_auroc_loco_mean",
    }


def test_map_to_native_undoes_resize_and_crop() -> None:
    amap = np.arange(16, dtype=np.float32).reshape(4, 4)
    same = map_to_native(amap, (4, 4), Preprocess(image_size=4))
    np.testing.assert_array_equal(same, amap)
    # resize 8 -> crop 4: the map covers rows/columns 2..5 of an 8 x 8 image, here 16 x 16 native
    out = map_to_native(amap, (16, 16), Preprocess(image_size=8, crop_size=4))
    assert out.shape == (16, 16)
    assert (out[:4] == 0).all() and (out[12:] == 0).all() and (out[:, :4] == 0).all()  # the minimum outside
    window = torch.nn.functional.interpolate(
        torch.from_numpy(amap)[None, None], size=(8, 8), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(out[4:12, 4:12], window[0, 0].numpy())


def test_report_tables_show_the_loco_columns_when_runs_have_them() -> None:
    from iadkit.bench.summary import metric_tables

    def run(method: str, logical: float) -> dict:
        metrics = {"image_auroc": 0.9, "image_auroc_structural": 0.95, "image_auroc_logical": logical}
        metrics |= {"image_auroc_loco_mean": (0.95 + logical) / 2, "auc_spro_0.05": 0.5, "auc_spro_0.05_logical": 0.4}
        return {
            "status": "done",
            "setting": "vanilla",
            "setting_params": {},
            "method": method,
            "params": {},
            "image_size": [64, 64],
            "dataset": "synthetic:/x",
            "category": "tray",
            "metrics": metrics,
        }

    tables = {t.metric: t for t in metric_tables([run("patchcore", 0.6), run("efficientad", 0.8)])}
    assert {"image_auroc_structural", "image_auroc_logical", "image_auroc_loco_mean", "auc_spro_0.05"} <= set(tables)
    assert "auc_spro_0.05_logical" not in tables  # kept in the database, not tabulated
    logical = tables["image_auroc_logical"]
    assert logical.title == "I-AUROC logical" and logical.best(logical.mean) == "efficientad"
    assert "image_auroc_logical" not in {
        t.metric for t in metric_tables([{**run("a", 0.5), "metrics": {"image_auroc": 0.5}}])
    }
