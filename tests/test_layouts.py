"""Dataset layouts on tiny fake trees: detection, counts, labels, mask matching, clear errors."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadkit.data import DatasetSplit, detect_layout, list_categories, load_dataset
from iadkit.data.layouts import seeded_split
from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import DatasetLayoutError, ImageReadError
from iadkit.types import ANOMALOUS, GOOD

SIZE = (12, 16)  # H, W


def img(path: Path, value: int = 100, size: tuple[int, int] = SIZE, channels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size + ((channels,) if channels > 1 else ())
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def mask(
    path: Path, box: tuple[int, int, int, int] = (2, 5, 3, 7), size: tuple[int, int] = SIZE, value: int = 255
) -> Path:
    """A mask with the rectangle rows box[0]:box[1], cols box[2]:box[3] set to `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = value
    Image.fromarray(m).save(path)
    return path


def make_mvtec(root: Path, category: str = "bottle", *, good_train: int = 3, with_masks: bool = True) -> Path:
    cat = root / category
    for i in range(good_train):
        img(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        img(cat / "test" / "good" / f"{i:03d}.png")
    for defect, n in (("crack", 2), ("scratch", 1)):
        for i in range(n):
            img(cat / "test" / defect / f"{i:03d}.png")
            if with_masks:
                mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("not a category")
    return cat


# -- mvtec ------------------------------------------------------------------------------
def test_mvtec_layout_counts_labels_and_masks(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "wood", good_train=4)
    assert detect_layout(tmp_path) == "mvtec"
    assert list_categories(tmp_path) == ["bottle", "wood"]
    split = load_dataset(tmp_path, category="bottle")
    assert isinstance(split, DatasetSplit) and split.layout == "mvtec" and split.category == "bottle"
    assert [Path(s.path).name for s in split.train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == GOOD and s.category == "bottle" for s in split.train)
    assert split.counts() == {"train": {"good": 3}, "test": {"good": 2, "crack": 2, "scratch": 1}}
    assert len(split.test_anomalous) == 3 and split.has_masks and split.defect_types == ["crack", "scratch"]
    crack0 = next(s for s in split.test if s.defect_type == "crack")
    assert crack0.label == ANOMALOUS
    assert crack0.mask_path == str(tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    m = crack0.load_mask(shape=SIZE)
    assert m.sum() == 3 * 4 and m[2:5, 3:7].all()
    assert len(load_dataset(tmp_path, "wood").train) == 4


def test_mvtec_masks_flow_through_imageset(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    split = load_dataset(tmp_path)  # one category: no need to name it
    ds = ImageSet(split.test, Preprocess(image_size=SIZE))
    masks = [ds.mask(i) for i in range(len(ds))]
    assert [int(m.sum()) for m in masks] == [0, 0, 12, 12, 12]


def test_single_category_root_schemes_and_unpacking(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "set", "screw")
    assert list_categories(cat) == ["screw"]
    assert len(load_dataset(cat).test) == 5
    train, test = load_dataset(f"mvtec:{tmp_path / 'set'}", category="screw")
    assert (len(train), len(test)) == (3, 5)
    train, test = load_dataset(f"synthetic:{tmp_path / 'set'}", category="screw")
    assert len(train) == 3
    with pytest.raises(DatasetLayoutError, match="iadkit data synth"):
        load_dataset(f"synthetic:{tmp_path / 'nothing'}", category="screw")
    with pytest.raises(DatasetLayoutError, match="names layout 'mvtec' but layout='visa'"):
        load_dataset(f"mvtec:{tmp_path / 'set'}", layout="visa")


def test_category_errors(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "wood")
    with pytest.raises(DatasetLayoutError, match=r"2 categories.*category="):
        load_dataset(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"'cable' not found.*bottle, wood"):
        load_dataset(tmp_path, "cable")


def test_missing_mask_is_an_error_unless_allowed(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset(tmp_path)
    assert "crack/001.png" in str(err.value) and "allow_missing_masks=True" in str(err.value)
    with pytest.warns(UserWarning, match="1 anomalous image"):
        split = load_dataset(tmp_path, allow_missing_masks=True)
    assert len(split.test_anomalous) == 3 and not split.has_masks
    assert sum(s.has_mask for s in split.test_anomalous) == 2


def test_missing_train_good_is_named(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    cat = make_mvtec(tmp_path, "wood")
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    (cat / "train" / "good").rmdir()
    assert list_categories(tmp_path) == ["bottle"]
    with pytest.raises(DatasetLayoutError, match=r"wood: missing folder train/good"):
        load_dataset(tmp_path, "wood")


def test_empty_train_and_bad_sources(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path)
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetLayoutError, match="no images found"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"(?s)layout not recognised.*mvtec:"):
        detect_layout(tmp_path / "other")
    with pytest.raises(DatasetLayoutError, match="unknown layout"):
        load_dataset(tmp_path, layout="imagenet")
    with pytest.raises(TypeError, match=r"'trian_fraction'.*accepts: allow_missing_masks"):
        load_dataset(tmp_path, trian_fraction=0.5)


def test_mask_of_wrong_size_names_both_files(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path)
    mask(cat / "ground_truth" / "crack" / "000_mask.png", size=(6, 8))
    split = load_dataset(tmp_path)
    s = next(s for s in split.test if s.defect_type == "crack")
    ds = ImageSet([s], Preprocess(image_size=SIZE))
    with pytest.raises(ImageReadError, match=r"000_mask.png: mask is 8x6 \(WxH\) but its image .*000.png is 16x12"):
        ds.mask(0)


# -- btad, loco, mvtec3d -----------------------------------------------------------------
def test_btad(tmp_path: Path) -> None:
    cat = tmp_path / "03"
    for i in range(3):
        img(cat / "train" / "ok" / f"{i:04d}.bmp")
    img(cat / "test" / "ok" / "0000.bmp")
    img(cat / "test" / "ko" / "0000.bmp")
    img(cat / "test" / "ko" / "0001.bmp")
    mask(cat / "ground_truth" / "ko" / "0000.png")
    mask(cat / "ground_truth" / "ko" / "0001.bmp")
    assert detect_layout(tmp_path) == "btad"
    split = load_dataset(tmp_path, "03")
    assert split.counts() == {"train": {"good": 3}, "test": {"good": 1, "ko": 2}}
    assert [Path(s.mask_path).name for s in split.test_anomalous] == ["0000.png", "0001.bmp"]
    assert split.test_anomalous[1].load_mask(SIZE).sum() == 12


def test_loco_merges_mask_folders_and_reads_validation(tmp_path: Path) -> None:
    cat = tmp_path / "pushpins"
    for i in range(3):
        img(cat / "train" / "good" / f"{i:03d}.png")
    img(cat / "validation" / "good" / "000.png")
    img(cat / "test" / "good" / "000.png")
    img(cat / "test" / "logical_anomalies" / "000.png")
    img(cat / "test" / "structural_anomalies" / "000.png")
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", box=(0, 2, 0, 2))
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(1, 3, 1, 3))  # overlaps 1 px
    mask(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", box=(5, 6, 5, 6))
    assert detect_layout(tmp_path) == "loco"
    split = load_dataset(tmp_path)
    assert split.layout == "loco" and len(split.validation) == 1 and len(split.train) == 3
    logical = next(s for s in split.test if s.defect_type == "logical_anomalies")
    assert len(logical.mask_paths) == 2 and logical.mask_path is None
    assert logical.load_mask(SIZE).sum() == 4 + 4 - 1
    assert split.has_masks


def test_mvtec3d_rgb(tmp_path: Path) -> None:
    cat = tmp_path / "cookie"
    for i in range(2):
        img(cat / "train" / "good" / "rgb" / f"{i:03d}.png")
    img(cat / "validation" / "good" / "rgb" / "000.png")
    img(cat / "test" / "good" / "rgb" / "000.png")
    mask(cat / "test" / "good" / "gt" / "000.png", box=(0, 0, 0, 0))
    img(cat / "test" / "crack" / "rgb" / "000.png")
    mask(cat / "test" / "crack" / "gt" / "000.png")
    (cat / "test" / "crack" / "xyz").mkdir()
    (cat / "test" / "crack" / "xyz" / "000.tiff").write_bytes(b"II*\x00")  # point cloud: ignored
    assert detect_layout(tmp_path) == "mvtec3d"
    split = load_dataset(tmp_path)
    assert split.counts() == {"train": {"good": 2}, "validation": {"good": 1}, "test": {"good": 1, "crack": 1}}
    crack = split.test_anomalous[0]
    assert crack.path.endswith("crack/rgb/000.png") and crack.mask_path.endswith("crack/gt/000.png")


# -- visa -------------------------------------------------------------------------------
def _visa(root: Path, rows: list[tuple[str, str, str, str, str]], name: str = "1cls.csv", header=None) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / name, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header or ["object", "split", "label", "image", "mask"])
        w.writerows(rows)


def test_visa_split_csv_and_instance_masks(tmp_path: Path) -> None:
    for i in range(3):
        img(tmp_path / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG")
    img(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
    labels = np.zeros(SIZE, np.uint8)
    labels[0, 0:2] = 1
    labels[3, 3:6] = 2  # a second defect region, numbered 2
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    Image.fromarray(labels).save(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png")
    img(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG")
    rows = [
        ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
        ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
        ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
        ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
        ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
    ]
    _visa(tmp_path, rows)
    assert detect_layout(tmp_path) == "visa"
    assert list_categories(tmp_path) == ["candle", "pcb1"]
    split = load_dataset(tmp_path, "candle")
    assert (len(split.train), len(split.test), len(split.test_anomalous)) == (2, 2, 1)
    bad = split.test_anomalous[0]
    assert bad.mask_values == "nonzero"
    np.testing.assert_array_equal(bad.load_mask(SIZE), labels > 0)
    assert bad.with_label(1).mask_values == "nonzero"
    assert pickle.loads(pickle.dumps(bad)) == bad  # travels to worker processes intact
    assert split.license == "CC BY 4.0"

    # 2-class split: anomalous training rows become train_anomalous
    _visa(
        tmp_path,
        [*rows[:2], ("candle", "train", "anomaly", rows[3][3], rows[3][4]), *rows[2:3]],
        name="2cls_fewshot.csv",
    )
    split2 = load_dataset(tmp_path, "candle", split_file="2cls_fewshot")
    assert len(split2.train_anomalous) == 1 and len(split2.train) == 2


def test_visa_errors(tmp_path: Path) -> None:
    img(tmp_path / "c" / "a.JPG")
    _visa(tmp_path, [("c", "train", "normal", "c/a.JPG", ""), ("c", "test", "normal", "c/missing.JPG", "")])
    with pytest.raises(DatasetLayoutError, match=r"(?s)1 image.*do not exist.*missing.JPG"):
        load_dataset(tmp_path, "c")
    _visa(tmp_path, [("c", "train", "normal", "c/a.JPG")], header=["object", "split", "label", "image"])
    with pytest.raises(DatasetLayoutError, match="column 'mask' missing"):
        load_dataset(tmp_path, "c")
    _visa(tmp_path, [("c", "train", "normal", "c/a.JPG", ""), ("c", "test", "anomaly", "c/a.JPG", "")])
    with pytest.raises(DatasetLayoutError, match="no ground-truth mask"):
        load_dataset(tmp_path, "c")


# -- kolektor2 --------------------------------------------------------------------------
def test_kolektorsdd2_labels_from_masks(tmp_path: Path) -> None:
    for part, ids, positives in (
        ("train", ("10000", "10001", "10002"), {"10001"}),
        ("test", ("20000", "20001"), {"20000"}),
    ):
        for i in ids:
            img(tmp_path / part / f"{i}.png")
            mask(tmp_path / part / f"{i}_GT.png", box=(1, 3, 1, 3) if i in positives else (0, 0, 0, 0))
    assert detect_layout(tmp_path) == "kolektor2"
    assert list_categories(tmp_path) == ["ksdd2"]
    split = load_dataset(tmp_path)
    assert [Path(s.path).stem for s in split.train] == ["10000", "10002"]
    assert [Path(s.path).stem for s in split.train_anomalous] == ["10001"]
    assert [(Path(s.path).stem, s.label) for s in split.test] == [("20000", 1), ("20001", 0)]
    assert split.test_anomalous[0].load_mask(SIZE).sum() == 4
    (tmp_path / "test" / "20001_GT.png").unlink()
    with pytest.raises(DatasetLayoutError, match="no _GT mask"):
        load_dataset(tmp_path)


# -- folder -----------------------------------------------------------------------------
def make_folder(root: Path, n_good: int = 10) -> Path:
    for i in range(n_good):
        img(root / "good" / f"g{i:02d}.png")
    img(root / "defect" / "d0.png")
    img(root / "defect" / "d1.png")
    mask(root / "mask" / "d0_GT.png")
    mask(root / "mask" / "d1.png")
    return root


def test_folder_seeded_split_and_masks(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts")
    assert detect_layout(root) == "folder" and list_categories(root) == ["parts"]
    split = load_dataset(root)
    assert (len(split.train), len(split.test_good), len(split.test_anomalous)) == (8, 2, 2)
    names = {Path(s.path).name for s in split.train + split.test_good}
    assert names == {f"g{i:02d}.png" for i in range(10)}  # a partition of the good images
    assert split.has_masks and [Path(s.mask_path).name for s in split.test_anomalous] == ["d0_GT.png", "d1.png"]
    # the documented rule: floor(n * fraction) images, the first of default_rng(seed).permutation(n)
    expected = sorted(np.random.default_rng(0).permutation(10)[:8])
    assert [Path(s.path).name for s in split.train] == [f"g{i:02d}.png" for i in expected]
    again = load_dataset(root)
    assert [s.path for s in again.train] == [s.path for s in split.train]
    other = load_dataset(root, seed=1, train_fraction=0.5)
    assert len(other.train) == 5 and [s.path for s in other.train] != [s.path for s in split.train][:5]


def test_folder_typed_defects_test_good_and_no_masks(tmp_path: Path) -> None:
    root = tmp_path / "lens"
    for i in range(3):
        img(root / "good" / f"{i}.png")
    img(root / "test_good" / "t.png")
    img(root / "Defects" / "scratch" / "s.png")
    img(root / "Defects" / "dent" / "d.png")
    split = load_dataset(root)
    assert len(split.train) == 3 and len(split.test_good) == 1
    assert split.defect_types == ["dent", "scratch"]
    assert not split.has_masks  # no mask folder: a classification-only set, not an error
    mask(root / "masks" / "scratch" / "s_mask.png")
    with pytest.raises(DatasetLayoutError, match=r"dent/d.png"):
        load_dataset(root)
    mask(root / "masks" / "d.png")
    split = load_dataset(root)
    assert split.has_masks


def test_folder_multi_category_root(tmp_path: Path) -> None:
    make_folder(tmp_path / "a", n_good=4)
    make_folder(tmp_path / "b", n_good=6)
    assert detect_layout(tmp_path) == "folder" and list_categories(tmp_path) == ["a", "b"]
    assert len(load_dataset(tmp_path, "b").train) == 4  # floor(6 * 0.8)


def test_seeded_split_rounding() -> None:
    train, rest = seeded_split(list(range(7)), 0.5, seed=3)
    assert len(train) == 3 and len(rest) == 4 and sorted(train + rest) == list(range(7))
    assert train == sorted(train)
    with pytest.raises(ValueError):
        seeded_split([1, 2], 0.0, 0)
