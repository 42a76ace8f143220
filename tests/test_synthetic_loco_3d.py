"""Synthetic generator: the tray's counting / position defects, the LOCO layout, the 3D mode."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from iadkit.data import load_dataset
from iadkit.data.loco import LocoSample, read_defects_config
from iadkit.data.point_maps import PointMapSample, valid_points
from iadkit.data.synth_defects import DEFECTS, DefectContext
from iadkit.data.synth_scenes import SCENES, tray_layout
from iadkit.data.synthetic import (
    CATEGORIES,
    CATEGORIES_3D,
    DEFECT_AREA_RANGE,
    LOGICAL_CATEGORIES,
    MANIFEST,
    SynthConfigError,
    generate,
    loco_defects_config,
    synthesize,
    synthesize_3d,
)
from iadkit.metrics import auc_spro

COUNTS = {"n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the tray: counts and positions --------------------------------------------------------------
def _tray_after(defect: str, seed: int) -> tuple[dict, dict]:
    """The good tray's parameters and the parts a logical defect renders (captured)."""
    rng = np.random.default_rng(seed)
    scene = SCENES["tray"]
    params = scene.sample(rng, 64)
    before = {slot: list(items) for slot, items in params["parts"].items()}
    captured = {}

    class Capture(DefectContext):
        def rerender(self, p):
            captured["parts"] = p["parts"]
            return super().rerender(p)

    DEFECTS[defect](Capture(scene, params, scene.render(params, 64), 64), rng)
    assert params["parts"] == before  # the good layout is not mutated
    return params, captured["parts"]


def _kinds(parts: dict) -> list[str]:
    return [kind for slot in sorted(parts) for kind, _ in parts[slot]]


def _turn(angle: float, heading: float) -> float:
    """Angle between a bolt's direction and the tray's heading, in [0, pi]."""
    return abs((angle - heading + math.pi) % (2 * math.pi) - math.pi)


@pytest.mark.parametrize("seed", range(6))
def test_tray_defects_change_the_count_or_the_places(seed):
    params, _ = _tray_after("missing_part", seed)
    layout = tray_layout(params["nut_row"])
    good = params["parts"]
    assert _kinds(good) == list(layout)  # one part per slot, one kind per row
    assert all(
        _turn(pose["angle"], params["heading"]) < 0.5
        for kind, pose in itertools.chain.from_iterable(good.values())
        if kind == "bolt"
    )
    _, missing = _tray_after("missing_part", seed)
    assert sum(len(v) for v in missing.values()) == 5 and sum(not v for v in missing.values()) == 1
    _, extra = _tray_after("extra_part", seed)
    assert sum(len(v) for v in extra.values()) == 7
    (slot,) = [s for s, v in extra.items() if len(v) == 2]
    assert {kind for kind, _ in extra[slot]} == {layout[slot]}  # a second part of the right kind
    _, swapped = _tray_after("swapped_parts", seed)
    kinds = _kinds(swapped)
    assert sorted(kinds) == sorted(layout)  # the right count of each kind...
    nut_row = params["nut_row"]
    assert kinds[3 * nut_row : 3 * nut_row + 3].count("bolt") == 1  # ...one of each in the wrong row
    assert kinds[3 * (1 - nut_row) : 3 * (1 - nut_row) + 3].count("nut") == 1
    bolts = [pose for kind, pose in itertools.chain.from_iterable(swapped.values()) if kind == "bolt"]
    assert all(_turn(pose["angle"], params["heading"]) < 0.5 for pose in bolts)  # pointing like the others
    _, reversed_ = _tray_after("reversed_part", seed)
    assert _kinds(reversed_) == list(layout)
    turns = [
        _turn(pose["angle"], params["heading"])
        for kind, pose in itertools.chain.from_iterable(reversed_.values())
        if kind == "bolt"
    ]
    assert sum(t > math.pi - 0.5 for t in turns) == 1 and sum(t < 0.5 for t in turns) == 2


def test_tray_layouts_vary_so_each_compartment_may_hold_either_kind():
    samples = [SCENES["tray"].sample(np.random.default_rng(seed), 64) for seed in range(12)]
    assert {p["nut_row"] for p in samples} == {0, 1}
    assert {round(p["heading"], 6) for p in samples} == {0.0, round(math.pi, 6)}


def test_tray_masks_are_where_the_image_changed():
    spec = LOGICAL_CATEGORIES["tray"]
    lo, hi = DEFECT_AREA_RANGE
    for d in spec.defect_types:
        for index in range(3):
            out = synthesize("tray", d, seed=1, index=index, image_size=64)
            diff = np.abs(out.image.astype(int) - out.reference.astype(int)).max(axis=2)
            assert lo <= out.mask.mean() <= hi, (d, out.mask.mean())
            assert diff[~out.mask].max() <= 0.15 * diff.max() + 2, d
            assert (diff[out.mask] > 0).mean() > 0.8, d
    # A swap changes two compartments: its single ground-truth region has two separate blobs.
    from scipy import ndimage

    out = synthesize("tray", "swapped_parts", seed=1, index=0, image_size=96)
    assert ndimage.label(out.mask)[1] >= 2
    assert "tray" not in CATEGORIES  # made on request: the default (benchmark) set is unchanged


# -- LOCO layout ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "loco"
    generate(root, seed=2, image_size=48, layout="loco", categories=["tray", "washer"], **COUNTS)
    return root


def test_loco_layout_files_config_and_loader(loco: Path) -> None:
    cat = loco / "tray"
    assert sorted(p.name for p in cat.iterdir()) == [
        "defects_config.json",
        "ground_truth",
        "test",
        "train",
        "validation",
    ]
    assert sorted(p.name for p in (cat / "test").iterdir()) == ["good", "logical_anomalies", "structural_anomalies"]
    assert len(list((cat / "validation" / "good").iterdir())) == 1  # ceil(3 / 6)
    config = read_defects_config(cat / "defects_config.json")
    assert config.to_list() == loco_defects_config(LOGICAL_CATEGORIES["tray"], 48)
    assert config[254].defect_name == "extra_part" and config[254].saturation_threshold == round(0.0025 * 48**2)
    record = json.loads((loco / MANIFEST).read_text())
    assert record["layout"] == "mvtec_loco_ad"
    which = record["categories"]["tray"]["defect_of_image"]
    assert len(which) == 4 * 2 + 2 * 2  # four logical and two structural types, two images each

    split = load_dataset(loco, "tray")
    assert split.layout == "loco" and split.counts()["test"] == {
        "good": 2,
        "logical_anomalies": 8,
        "structural_anomalies": 4,
    }
    for s in split.test_anomalous:
        assert isinstance(s, LocoSample)
        (region,) = s.load_regions((48, 48))
        kind, stem = Path(s.path).parent.name, Path(s.path).stem
        assert region.name == which[f"{kind}/{stem}"]
        mask = np.asarray(Image.open(s.mask_paths[0]))
        assert set(np.unique(mask)) == {
            0,
            config.entries[[e.defect_name for e in config].index(region.name)].pixel_value,
        }
    assert load_dataset(f"synthetic:{loco}", "tray").layout == "loco"  # the record names the layout


def test_loco_images_are_the_mvtec_images_regrouped(loco: Path, tmp_path: Path) -> None:
    generate(tmp_path, seed=2, image_size=48, categories=["tray"], **COUNTS)
    mvtec = tmp_path / "tray"
    which = json.loads((loco / MANIFEST).read_text())["categories"]["tray"]["defect_of_image"]
    per_type: dict[str, list[str]] = {}
    for rel, defect in which.items():
        per_type.setdefault(defect, []).append(rel)
    for defect, rels in per_type.items():
        for i, rel in enumerate(sorted(rels)):
            assert (loco / "tray" / "test" / f"{rel}.png").read_bytes() == (
                mvtec / "test" / defect / f"{i:03d}.png"
            ).read_bytes()
    assert (loco / "tray" / "train" / "good" / "002.png").read_bytes() == (
        mvtec / "train" / "good" / "002.png"
    ).read_bytes()


def test_loco_spro_on_the_ground_truth_itself(loco: Path) -> None:
    """A map equal to the ground truth scores AUC-sPRO 1; one marking half a swapped-parts
    region still saturates it (threshold 50 %)."""
    split = load_dataset(loco, "tray")
    regions = [s.load_regions((48, 48)) for s in split.test]
    perfect = [
        np.any([r.mask for r in regs], axis=0).astype(np.float32) if regs else np.zeros((48, 48), np.float32)
        for regs in regions
    ]
    assert auc_spro(perfect, regions) == pytest.approx(1.0)
    i = next(k for k, regs in enumerate(regions) if regs and regs[0].name == "swapped_parts")
    region = regions[i][0]
    half = np.zeros((48, 48), np.float32)
    ys, xs = np.nonzero(region.mask)
    keep = np.argsort(xs + 1000 * ys)[: region.saturation_area]
    half[ys[keep], xs[keep]] = 1.0
    assert auc_spro([half, perfect[0]], [regions[i], regions[0]]) == pytest.approx(1.0)


def test_layout_errors(tmp_path: Path, loco: Path) -> None:
    with pytest.raises(SynthConfigError, match="unknown layout"):
        generate(tmp_path / "a", layout="visa")
    with pytest.raises(SynthConfigError, match="holds a synthetic dataset in the mvtec_loco_ad layout"):
        generate(loco, seed=2, image_size=48, categories=["tray"], **COUNTS)
    with pytest.raises(SynthConfigError, match="3D category"):
        generate(tmp_path / "b", categories=["puck"])
    with pytest.raises(SynthConfigError, match="needs a 3D category"):
        generate(tmp_path / "c", categories=["tray"], layout="mvtec3d")
    with pytest.raises(SynthConfigError, match="n_validation applies"):
        generate(tmp_path / "d", n_validation=2)
    with pytest.raises(SynthConfigError, match="use synthesize_3d"):
        synthesize("puck")
    with pytest.raises(SynthConfigError, match="unknown synthetic 3D category"):
        synthesize_3d("tray")


# -- 3D ---------------------------------------------------------------------------------------------
def test_3d_defects_show_in_the_modalities_they_claim():
    spec = CATEGORIES_3D["puck"]
    assert set(spec.rgb_invisible) == {"dent", "bump"}
    for d, (geometric, rgb) in spec.defects.items():
        for index in range(2):
            out = synthesize_3d("puck", d, seed=0, index=index, image_size=64)
            assert out.image.shape == (64, 64, 3) and out.xyz.shape == (64, 64, 3) and out.xyz.dtype == np.float32
            assert np.array_equal(out.image, out.reference) == (not rgb), d  # byte-identical when invisible
            changed = np.any(out.xyz != out.reference_xyz, axis=2)
            assert changed.any() == geometric, d
            if geometric:
                # The twins share their sensor noise: outside the mask the depth changed by less
                # than the mask rule's threshold, max(0.05 mm, 15 % of the largest change).
                dz = np.abs(out.xyz[..., 2] - out.reference_xyz[..., 2])
                assert dz[out.mask].max() > 0.0002  # at least 0.2 mm, five times the depth noise
                assert dz[~out.mask].max() <= max(0.00005, 0.15 * dz.max()) + 1e-6, d
            lo, hi = DEFECT_AREA_RANGE
            assert lo <= out.mask.mean() <= hi


def test_3d_point_maps_are_plausible_and_deterministic():
    a = synthesize_3d("puck", None, seed=4, index=1, image_size=64, split="train")
    b = synthesize_3d("puck", None, seed=4, index=1, image_size=64, split="train")
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.image, b.image)
    valid = valid_points(a.xyz)
    assert 0.9 < valid.mean() < 0.99  # dropouts and the puck's steep side wall have no point
    z = a.xyz[..., 2][valid]
    assert z.min() > 0.27 and z.max() < 0.32  # metres: plate ~0.3 m away, puck 12 mm closer
    assert np.ptp(z) > 0.01


def test_3d_layout_loader_and_plane_removal(tmp_path: Path) -> None:
    root = tmp_path / "d3"
    summary = generate(root, seed=0, image_size=48, layout="mvtec3d", **COUNTS)
    assert list(summary.categories) == ["puck"] and summary.categories["puck"].validation_good == 1
    cat = root / "puck"
    assert sorted(p.name for p in (cat / "test" / "dent").iterdir()) == ["gt", "rgb", "xyz"]
    with tifffile.TiffFile(cat / "test" / "dent" / "xyz" / "000.tiff") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].shape == (48, 48, 3) and tif.pages[0].dtype == np.float32
    split = load_dataset(root)
    assert split.layout == "mvtec3d"
    assert split.counts()["test"] == {"good": 2, "bump": 2, "contamination": 2, "cut": 2, "dent": 2}
    sample = split.test_anomalous[0]
    assert isinstance(sample, PointMapSample)
    expected = synthesize_3d("puck", "bump", seed=0, index=0, image_size=48)
    np.testing.assert_array_equal(sample.load_xyz(), expected.xyz)
    np.testing.assert_array_equal(sample.load_mask((48, 48)), expected.mask)
    # BTF's preprocessing removes the plate and keeps the puck's top.
    cleaned = load_dataset(root, remove_plane=True).train[0].load_xyz()
    kept = valid_points(cleaned)
    z = cleaned[..., 2][kept]
    assert 0.15 < kept.mean() < 0.4 and z.max() < 0.3 - 0.005
    again = tmp_path / "again"
    generate(again, seed=0, image_size=48, layout="mvtec3d", **COUNTS)
    assert _files(root / "puck") == _files(again / "puck")
