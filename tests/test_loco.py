"""MVTec LOCO layout on a fake tree: kinds kept apart, defects_config.json, per-defect regions, sPRO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadkit.data import load_dataset
from iadkit.data.loco import DefectsConfig, LocoSample, read_defect_mask, read_defects_config
from iadkit.errors import DatasetLayoutError, ImageReadError
from iadkit.metrics import SaturatedRegion, auc_spro, auc_spro_by_type, image_auroc_by_type

SIZE = (10, 12)  # H, W
CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 253, "saturation_threshold": 3, "relative_saturation": False},
]


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def defect(path: Path, box: tuple[int, int, int, int], value: int) -> Path:
    m = np.zeros(SIZE, np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = value
    return png(path, m)


def make_loco(root: Path, config=CONFIG) -> Path:
    cat = root / "tray"
    image = np.full((*SIZE, 3), 120, np.uint8)
    for i in range(3):
        png(cat / "train" / "good" / f"{i:03d}.png", image)
    png(cat / "validation" / "good" / "000.png", image)
    for i in range(2):
        png(cat / "test" / "good" / f"{i:03d}.png", image)
    png(cat / "test" / "logical_anomalies" / "000.png", image)
    png(cat / "test" / "structural_anomalies" / "000.png", image)
    gt = cat / "ground_truth"
    defect(gt / "logical_anomalies" / "000" / "000.png", (0, 2, 0, 4), 255)  # 8 px, saturates at 8
    defect(gt / "logical_anomalies" / "000" / "001.png", (1, 5, 2, 4), 254)  # 8 px, overlaps 2; saturates at 4
    defect(gt / "structural_anomalies" / "000" / "000.png", (6, 8, 6, 11), 253)  # 10 px, saturates at 3
    if config is not None:
        (cat / "defects_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return cat


def test_kinds_regions_and_saturation_areas(tmp_path: Path) -> None:
    make_loco(tmp_path)
    split = load_dataset(tmp_path)
    assert split.layout == "loco"
    assert split.counts()["test"] == {"good": 2, "logical_anomalies": 1, "structural_anomalies": 1}
    assert all(isinstance(s, LocoSample) for s in split.test)
    assert [s.defect_type for s in split.test] == ["good", "good", "logical_anomalies", "structural_anomalies"]
    logical, structural = split.test[2], split.test[3]
    # The merged mask (usual pixel metrics) and the separate regions (sPRO).
    assert logical.load_mask(SIZE).sum() == 8 + 8 - 2
    regions = logical.load_regions(SIZE)
    assert [(r.name, int(r.mask.sum()), r.saturation_area) for r in regions] == [
        ("missing_part", 8, 8),
        ("extra_part", 8, 4),
    ]
    (scratch,) = structural.load_regions()
    assert (scratch.name, int(scratch.mask.sum()), scratch.saturation_area) == ("scratch", 10, 3)
    assert split.test[0].load_regions() == []
    assert split.test[0].defects is not None and split.test[0].defects.names == [
        "missing_part",
        "extra_part",
        "scratch",
    ]


def test_per_kind_image_auroc_and_spro_from_the_loaded_split(tmp_path: Path) -> None:
    make_loco(tmp_path)
    split = load_dataset(tmp_path)
    types = [s.defect_type for s in split.test]
    labels = [s.label for s in split.test]
    scores = [0.1, 0.3, 0.2, 0.9]  # the logical image scores between the two good ones
    assert image_auroc_by_type(labels, scores, types) == {
        "logical_anomalies": 0.5,
        "structural_anomalies": 1.0,
        "mean": 0.75,
    }
    # Maps that light up exactly 3 pixels of the scratch and all of the logical defects, 0
    # elsewhere: every region saturates before any false positive.
    regions = [s.load_regions(SIZE) for s in split.test]
    maps = [np.zeros(SIZE, np.float32) for _ in split.test]
    maps[2][regions[2][0].mask | regions[2][1].mask] = 1.0
    maps[3][6, 6:9] = 1.0
    assert auc_spro(maps, regions) == pytest.approx(1.0)
    by_type = auc_spro_by_type(maps, regions, types, fpr_limits=(0.05,))
    assert by_type["structural_anomalies"][0.05] == pytest.approx(1.0)
    # Unsaturated, the scratch is found to 3/10 only; its 7 other pixels tie with the normal
    # pixels at 0, a straight segment from (0, 0.3) to (1, 1): mean over FPR [0, 0.05] = 0.3175.
    unsaturated = [[SaturatedRegion.unsaturated(regions[3][0].mask)]]
    assert auc_spro([maps[3]], unsaturated) == pytest.approx(0.3 + 0.7 * 0.025)


def test_missing_config_loads_but_regions_say_what_is_missing(tmp_path: Path) -> None:
    make_loco(tmp_path, config=None)
    split = load_dataset(tmp_path)
    assert split.test[0].load_regions() == []
    with pytest.raises(DatasetLayoutError, match=r"no defects_config.json was found"):
        split.test[2].load_regions()


@pytest.mark.parametrize(
    "config, match",
    [
        ("[{", "not valid JSON"),
        ("{}", "non-empty JSON list"),
        ([{"defect_name": "a", "pixel_value": 255, "saturation_threshold": 1.0}], "lacks relative_saturation"),
        (
            [{"defect_name": "a", "pixel_value": 0, "saturation_threshold": 1.0, "relative_saturation": True}],
            "pixel_value",
        ),
        (
            [{"defect_name": "a", "pixel_value": 9, "saturation_threshold": 1.5, "relative_saturation": True}],
            r"\(0, 1\]",
        ),
        (
            [{"defect_name": "a", "pixel_value": 9, "saturation_threshold": 2.5, "relative_saturation": False}],
            "whole number",
        ),
        (
            [{"defect_name": "a", "pixel_value": 9, "saturation_threshold": 2, "relative_saturation": "yes"}],
            "true or false",
        ),
        ([*CONFIG, dict(CONFIG[0], defect_name="dup")], "listed more than once"),
    ],
)
def test_malformed_config_is_a_clear_error_at_load_time(tmp_path: Path, config, match: str) -> None:
    cat = make_loco(tmp_path, config=config)
    with pytest.raises(DatasetLayoutError, match=match) as info:
        load_dataset(tmp_path)
    assert str(cat / "defects_config.json") in str(info.value)


def test_bad_mask_files(tmp_path: Path) -> None:
    cat = make_loco(tmp_path)
    gt = cat / "ground_truth" / "logical_anomalies" / "000"
    defect(gt / "001.png", (1, 5, 2, 4), 17)  # a value the config does not list
    split = load_dataset(tmp_path)
    with pytest.raises(DatasetLayoutError, match="pixel value 17 is not listed"):
        split.test[2].load_regions()
    two = np.zeros(SIZE, np.uint8)
    two[0, 0], two[1, 1] = 255, 254
    png(gt / "001.png", two)
    with pytest.raises(ImageReadError, match="exactly one defect"):
        read_defect_mask(gt / "001.png")
    png(gt / "001.png", np.zeros(SIZE, np.uint8))
    with pytest.raises(ImageReadError, match="no defect pixel"):
        read_defect_mask(gt / "001.png")
    with pytest.raises(ImageReadError, match="mask is 12x10"):
        read_defect_mask(gt / "000.png", expected_shape=(5, 5))


def test_config_round_trip_and_lookup(tmp_path: Path) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(CONFIG))
    cfg = read_defects_config(path)
    assert isinstance(cfg, DefectsConfig) and len(cfg) == 3 and 254 in cfg and 17 not in cfg
    assert cfg[253].saturation_threshold == 3 and not cfg[253].relative_saturation
    assert cfg.to_list() == CONFIG
    with pytest.raises(DatasetLayoutError, match="no such file"):
        read_defects_config(tmp_path / "nope.json")
