"""The synthetic dataset generator: layout, ground truth, determinism, difficulty, atomic writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from iadkit.data import synthetic
from iadkit.data.synthetic import (
    CATEGORIES,
    DEFECT_AREA_RANGE,
    MANIFEST,
    PRESETS,
    SynthConfigError,
    SynthSummary,
    generate,
    synthesize,
)
from iadkit.errors import DatasetLayoutError, IadkitError

SIZE = 48
COUNTS = {"n_train": 4, "n_test_good": 3, "n_test_per_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, generate(root, seed=3, image_size=SIZE, **COUNTS)


# -- layout and ground truth ---------------------------------------------------------------------
def test_layout_counts_and_masks(tiny: tuple[Path, SynthSummary]) -> None:
    root, summary = tiny
    assert set(summary.categories) == set(CATEGORIES)
    kinds = {spec.kind for spec in CATEGORIES.values()}
    assert kinds == {"texture", "object"}
    assert sum(s.kind == "texture" for s in CATEGORIES.values()) >= 2
    assert sum(s.kind == "object" for s in CATEGORIES.values()) >= 2
    families = {fam for spec in CATEGORIES.values() for fam in spec.defects.values()}
    assert {"scratch", "crack", "stain", "missing_part", "extra_part"} <= families and families & {"hole", "dent"}

    lo, hi = DEFECT_AREA_RANGE
    for name, spec in CATEGORIES.items():
        cat = root / name
        assert sorted(p.name for p in cat.iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (cat / "train").iterdir()] == ["good"]
        train = sorted(p.name for p in (cat / "train" / "good").iterdir())
        assert train == ["000.png", "001.png", "002.png", "003.png"]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *spec.defect_types])
        assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        # Good images have no masks; every defect type has exactly one mask per image.
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(spec.defect_types)
        for d in spec.defect_types:
            images = sorted((cat / "test" / d).iterdir())
            masks = sorted((cat / "ground_truth" / d).iterdir())
            assert [p.name for p in images] == ["000.png", "001.png"]
            assert [p.name for p in masks] == ["000_mask.png", "001_mask.png"]
            for ip, mp in zip(images, masks):
                img, mask = _load(ip), _load(mp)
                assert img.shape[:2] == mask.shape == (SIZE, SIZE)
                assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}, mp
                assert lo <= (mask == 255).mean() <= hi, (mp, (mask == 255).mean())
        counts = summary.categories[name]
        assert (counts.train_good, counts.test_good) == (4, 3)
        assert counts.test_defects == dict.fromkeys(spec.defect_types, 2)
        n_masks = 2 * len(spec.defect_types)
        assert counts.total == 4 + 3 + 2 * len(spec.defect_types) == len(list(cat.rglob("*.png"))) - n_masks
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders or files left


def test_grayscale_and_rgb_files(tiny: tuple[Path, SynthSummary]) -> None:
    root, _ = tiny
    assert {spec.channels for spec in CATEGORIES.values()} == {1, 3}
    for name, spec in CATEGORIES.items():
        for path in [*(root / name / "train" / "good").glob("*.png"), *(root / name / "test").rglob("*.png")]:
            with Image.open(path) as im:
                assert im.mode == ("L" if spec.channels == 1 else "RGB"), path
        for path in (root / name / "ground_truth").rglob("*.png"):
            with Image.open(path) as im:
                assert im.mode == "L"


def test_mask_is_exactly_where_the_defect_changed_the_image() -> None:
    """The reference is the same shot without the defect: compare them pixel by pixel."""
    for name, spec in CATEGORIES.items():
        for d in spec.defect_types:
            out = synthesize(name, d, seed=1, index=0, image_size=64)
            assert out.reference is not None and out.mask is not None
            diff = np.abs(out.image.astype(int) - out.reference.astype(int)).max(axis=2)
            peak = diff.max()
            # Every clearly changed pixel is in the mask; outside it only faint fringes remain.
            # (+2: both images are rounded to uint8 after the mask is made on the float images.)
            strong = diff > 0.15 * peak + 2
            assert not (strong & ~out.mask).any(), (name, d)
            assert diff[~out.mask].max() <= 0.15 * peak + 2, (name, d)
            # Inside the mask the image did change (enclosed gaps of blobs may be filled).
            assert (diff[out.mask] > 0).mean() > 0.8, (name, d)


def test_missing_hole_mask_is_one_bolt_hole() -> None:
    """Hand-computed: a washer bolt hole has radius 0.045 * size * scale, scale in [0.97, 1.03]."""
    size = 128
    for index in range(3):
        out = synthesize("washer", "missing_hole", seed=0, index=index, image_size=size)
        _, n = ndimage.label(out.mask)
        assert n == 1
        r_min, r_max = 0.045 * size * 0.97, 0.045 * size * 1.03
        assert math.pi * (r_min - 1) ** 2 <= out.mask.sum() <= math.pi * (r_max + 1) ** 2
        # Where the hole was, the washer now shows metal: brighter than the dark belt seen through a hole.
        assert out.image[out.mask].mean() > out.reference[out.mask].mean() + 40


def test_extra_print_adds_an_icon_to_the_empty_slot() -> None:
    out = synthesize("label", "extra_print", seed=0, index=0, image_size=128)
    # One connected blob of icon size: square 0.08^2, disc pi*0.05^2 or diamond 2*0.058^2 of the
    # image (0.0064-0.0079), plus a blur fringe of at most 1 px along the <= 41 px outline (0.0025).
    assert ndimage.label(out.mask)[1] == 1
    assert 0.0058 <= out.mask.mean() <= 0.0104  # + a fringe of <= 1 px (blur) around the icon
    assert out.image[out.mask].mean() < out.reference[out.mask].mean() - 60  # dark ink on white paper


def test_good_images_vary_naturally() -> None:
    """Position jitter and rotation of objects, phase and lighting for textures."""
    centres = []
    for i in range(8):
        img = synthesize("washer", None, seed=0, index=i, image_size=64, split="train").image[..., 0]
        ys, xs = np.nonzero(img > 110)
        centres.append((xs.mean(), ys.mean()))
    assert np.ptp(np.array(centres), axis=0).min() > 1.0  # the part moves by more than a pixel
    fabric = [synthesize("fabric", None, seed=0, index=i, image_size=64, split="train").image for i in range(4)]
    assert all(not np.array_equal(fabric[0], f) for f in fabric[1:])
    means = [f.mean() for f in fabric]
    assert np.ptp(means) > 1.0  # lighting gain differs between shots


# -- determinism ---------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_images(tiny: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    root, _ = tiny
    again = generate(tmp_path / "again", seed=3, image_size=SIZE, **COUNTS)
    assert again.to_dict()["categories"] == {k: v.to_dict() for k, v in tiny[1].categories.items()}
    assert _files(root) == _files(tmp_path / "again")
    # A subset of categories gives the same files for those categories.
    generate(tmp_path / "one", seed=3, image_size=SIZE, categories=["washer"], **COUNTS)
    one = _files(tmp_path / "one" / "washer")
    assert one == _files(root / "washer")
    # Another seed: every image differs.
    generate(tmp_path / "other", seed=4, image_size=SIZE, categories=["washer"], **COUNTS)
    other = _files(tmp_path / "other" / "washer")
    assert one.keys() == other.keys()
    assert all(one[k] != other[k] for k in one if not k.endswith("_mask.png"))


def test_counts_and_size_follow_preset_and_overrides(tmp_path: Path) -> None:
    summary = generate(tmp_path, preset="small", categories=["metal"])
    p = PRESETS["small"]
    c = summary.categories["metal"]
    assert (c.train_good, c.test_good) == (p["n_train"], p["n_test_good"])
    assert set(c.test_defects.values()) == {p["n_test_per_defect"]}
    assert len(list((tmp_path / "metal" / "train" / "good").glob("*.png"))) == p["n_train"]
    assert _load(tmp_path / "metal" / "test" / "good" / "000.png").shape == (p["image_size"], p["image_size"])
    summary = generate(
        tmp_path / "o",
        preset="demo",
        image_size=40,
        n_train=2,
        n_test_good=1,
        n_test_per_defect=1,
        categories="metal",  # one name as a plain string
        progress=True,
    )
    assert summary.image_size == 40 and summary.categories["metal"].total == 2 + 1 + 3
    assert _load(tmp_path / "o" / "metal" / "train" / "good" / "001.png").shape == (40, 40)


# -- difficulty: defects are small, local, and of realistic contrast -----------------------------------
def _global_stats(img: np.ndarray) -> list[float]:
    g = img.astype(np.float64).mean(axis=2) / 255.0
    gy, gx = np.gradient(g)
    return [g.mean(), g.std(), np.hypot(gx, gy).mean()]


@pytest.fixture(scope="module")
def test_sets() -> dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:
    """Per category: (train good, test good, test defective) at 64 px, in memory."""
    sets = {}
    for name, spec in CATEGORIES.items():
        train = [synthesize(name, None, seed=0, index=i, image_size=64, split="train").image for i in range(8)]
        good = [synthesize(name, None, seed=0, index=i, image_size=64).image for i in range(40)]
        bad = [synthesize(name, d, seed=0, index=i, image_size=64).image for d in spec.defect_types for i in range(10)]
        sets[name] = (train, good, bad)
    return sets


def test_global_statistics_do_not_reveal_defects(test_sets) -> None:
    """Image-level AUROC of mean, std and mean gradient magnitude stays near chance (< 0.75 either way)."""
    for name, (_, good, bad) in test_sets.items():
        y = [0] * len(good) + [1] * len(bad)
        stats = np.array([_global_stats(im) for im in good + bad])
        for k, stat in enumerate(("mean", "std", "gradient")):
            auc = roc_auc_score(y, stats[:, k])
            assert max(auc, 1 - auc) < 0.75, (name, stat, auc)


def _patch_knn_scores(train: list[np.ndarray], images: list[np.ndarray], size: int = 64) -> list[float]:
    """A minimal local detector: flat-fielded 5x5 pixel patches, distance to the nearest training patch, max."""

    def prep(im: np.ndarray) -> np.ndarray:
        f = im.astype(np.float32) / 255.0
        flat = ndimage.gaussian_filter(f.mean(axis=2), size / 6)[..., None] + 1e-3
        return ndimage.gaussian_filter(f / flat, (0.8, 0.8, 0))

    def patches(f: np.ndarray) -> np.ndarray:
        p = sliding_window_view(f, (5, 5), axis=(0, 1))[::3, ::3]
        return p.reshape(p.shape[0] * p.shape[1], -1)

    bank = np.concatenate([patches(prep(im)) for im in train])
    bank_sq = (bank**2).sum(1)
    scores = []
    for im in images:
        q = patches(prep(im))
        d2 = (q**2).sum(1)[:, None] + bank_sq[None] - 2 * q @ bank.T
        scores.append(float(np.sqrt(max(d2.min(axis=1).max(), 0.0))))
    return scores


def test_local_detector_beats_global_statistics_on_textures(test_sets) -> None:
    """Looking locally finds the structural defects that global statistics miss.

    (On objects, raw-pixel patches need many more training poses, and logical defects are
    locally normal by design, so this minimal detector is only asked to work on textures.)
    """
    for name, spec in CATEGORIES.items():
        if spec.kind != "texture":
            continue
        train, good, bad = test_sets[name]
        y = [0] * len(good) + [1] * len(bad)
        local = roc_auc_score(y, _patch_knn_scores(train, good + bad))
        stats = np.array([_global_stats(im) for im in good + bad])
        best_global = max(max(a, 1 - a) for a in (roc_auc_score(y, stats[:, k]) for k in range(3)))
        assert local >= 0.85 and local > best_global + 0.15, (name, local, best_global)


# -- re-runs, interruptions and refusals ------------------------------------------------------------------
def test_rerun_with_same_parameters_is_a_noop(tmp_path: Path) -> None:
    kw = dict(seed=0, image_size=40, n_train=2, n_test_good=1, n_test_per_defect=1, categories=["metal", "washer"])
    generate(tmp_path, **kw)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    again = generate(tmp_path, **kw)
    assert all(not c.written for c in again.categories.values())
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == stamps
    # Other parameters: the category is regenerated and its record updated; the other is kept.
    changed = generate(tmp_path, **{**kw, "n_train": 3, "categories": ["metal"]})
    assert changed.categories["metal"].written
    assert len(list((tmp_path / "metal" / "train" / "good").glob("*.png"))) == 3
    record = json.loads((tmp_path / MANIFEST).read_text())
    assert record["categories"]["metal"]["parameters"]["n_train"] == 3
    assert record["categories"]["washer"]["parameters"]["n_train"] == 2
    assert record["categories"]["metal"]["parameters"]["seed"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_run_leaves_no_partial_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(seed=0, image_size=40, n_train=2, n_test_good=1, n_test_per_defect=1)
    generate(tmp_path, categories=["metal"], **kw)
    before = _files(tmp_path / "metal")
    real = synthetic.synthesize
    calls = {"n": 0}

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second category (the first has 6 or 7 images)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthesize", dies_midway)
    with pytest.raises(KeyboardInterrupt):  # metal regenerated with new counts, then washer dies
        generate(tmp_path, categories=["metal", "washer"], **{**kw, "n_train": 3})
    assert not (tmp_path / "washer").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    record = json.loads((tmp_path / MANIFEST).read_text())
    assert set(record["categories"]) == {"metal"} and record["categories"]["metal"]["parameters"]["n_train"] == 3
    assert len(list((tmp_path / "metal" / "train" / "good").glob("*.png"))) == 3

    # Interrupting an overwrite keeps the previous, complete category and its record.
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, categories=["washer", "metal"], **kw)  # washer done at call 6, metal dies at 9
    assert len(list((tmp_path / "metal" / "train" / "good").glob("*.png"))) == 3
    assert json.loads((tmp_path / MANIFEST).read_text())["categories"]["metal"]["parameters"]["n_train"] == 3

    # A killed process cannot clean up: its temp folder is removed by the next run.
    monkeypatch.setattr(synthetic, "synthesize", real)
    (tmp_path / ".wood.partial-deadbeef" / "train").mkdir(parents=True)
    summary = generate(tmp_path, categories=["washer", "metal"], **kw)
    assert not summary.categories["washer"].written and summary.categories["metal"].written
    assert _files(tmp_path / "metal") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "wood" / "train" / "good").mkdir(parents=True)
    (tmp_path / "wood" / "train" / "good" / "mine.png").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="not made by the synthetic generator"):
        generate(tmp_path, categories=["wood"], image_size=40, n_train=1, n_test_good=1, n_test_per_defect=1)
    assert (tmp_path / "wood" / "train" / "good" / "mine.png").read_bytes() == b"x"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"categories": ["glass"]}, "unknown synthetic category 'glass'"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"image_size": 16}, "image_size must be an integer from 32"),
        ({"n_train": 0}, "n_train must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"categories": []}, "categories is empty"),
    ],
)
def test_bad_parameters_are_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SynthConfigError, match=match) as info:
        generate(tmp_path / "x", **kwargs)
    assert isinstance(info.value, IadkitError)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_synthesize_rejects_unknown_defect() -> None:
    with pytest.raises(SynthConfigError, match="has no defect type 'crack'; choose from scratch, dent"):
        synthesize("washer", "crack")


def test_summary_table_dict_and_record(tiny: tuple[Path, SynthSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    root, summary = tiny
    table = summary.table()
    assert isinstance(table, Table) and table.row_count == len(CATEGORIES)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "missing_hole" in text and "gray" in text and "RGB" in text
    d = summary.to_dict()
    json.dumps(d)
    assert d["seed"] == 3 and d["image_size"] == SIZE and d["root"] == str(root)
    assert d["categories"]["label"]["test_defects"] == dict.fromkeys(CATEGORIES["label"].defect_types, 2)
    record = json.loads((root / MANIFEST).read_text())
    assert record["layout"] == "mvtec_ad"
    params = record["categories"]["fabric"]["parameters"]
    assert params["seed"] == 3 and params["image_size"] == SIZE and params["n_train"] == 4
