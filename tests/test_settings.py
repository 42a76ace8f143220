"""The survey's settings as IM-IAD runs them: exact counts on a hand-made split (caps,
int() truncation, no overlap), determinism per seed, few-shot augmentation, refusals."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from iadkit.settings import (
    SettingError,
    apply_setting,
    check_combination,
    few_shot,
    injected_noise,
    noisy,
    parse_setting,
    semi_supervised,
    usable_training,
)
from iadkit.settings.augment import AugmentedSample, augment_image, fewshot_variants, variant_schedule
from iadkit.types import ANOMALOUS, GOOD, Sample

# category "a": 25 good training images, 2 labelled training defects, test 6 good + 7 defects;
# category "b": 12 good training images, test 4 good + 4 defects.
COUNTS = {
    "a": dict(good=25, train_bad=2, test_good=6, test_bad=7),
    "b": dict(good=12, train_bad=0, test_good=4, test_bad=4),
}


def split() -> tuple[list[Sample], list[Sample]]:
    train, test = [], []
    for cat, n in COUNTS.items():
        train += [Sample(f"{cat}/train/good/{i:03d}.png", GOOD, cat, "good") for i in range(n["good"])]
        train += [
            Sample(f"{cat}/train/crack/{i:03d}.png", ANOMALOUS, cat, "crack", mask_path="m.png")
            for i in range(n["train_bad"])
        ]
        test += [Sample(f"{cat}/test/good/{i:03d}.png", GOOD, cat, "good") for i in range(n["test_good"])]
        test += [
            Sample(f"{cat}/test/scratch/{i:03d}.png", ANOMALOUS, cat, "scratch", mask_path="m.png")
            for i in range(n["test_bad"])
        ]
    return train, test


def paths(samples, category=None, label=None) -> list[str]:
    return [
        s.path for s in samples if (category is None or s.category == category) and (label is None or s.label == label)
    ]


# -- few-shot ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_few_shot_keeps_k_good_images_per_category_and_the_whole_test_set(k):
    train, test = split()
    tr, te = few_shot(train, test, seed=0, k=k)
    assert len(paths(tr, "a")) == k and len(paths(tr, "b")) == k
    assert all(s.label == GOOD for s in tr) and set(paths(tr)) <= set(paths(train, label=GOOD))
    assert te == test  # the test set is untouched
    assert paths(tr) == [p for p in paths(train) if p in set(paths(tr))]  # dataset order kept


def test_few_shot_is_deterministic_per_seed_nested_in_k_and_per_category():
    train, test = split()
    assert few_shot(train, test, seed=3, k=4) == few_shot(train, test, seed=3, k=4)
    draws = {seed: paths(few_shot(train, test, seed=seed, k=4)[0], "a") for seed in range(5)}
    assert len({tuple(d) for d in draws.values()}) == 5  # different seeds, different shots
    sets = [set(paths(few_shot(train, test, seed=7, k=k)[0])) for k in (1, 2, 4, 8)]
    assert sets[0] < sets[1] < sets[2] < sets[3]  # a larger k keeps the smaller k's shots
    only_a = [s for s in train if s.category == "a"]  # a category's draw ignores the others
    assert paths(few_shot(only_a, [], seed=7, k=4)[0]) == paths(few_shot(train, test, seed=7, k=4)[0], "a")


def test_few_shot_with_k_above_a_category_uses_it_all_and_warns(caplog):
    train, test = split()
    with caplog.at_level(logging.WARNING, logger="iadkit.settings.fewshot"):
        tr, _ = few_shot(train, test, seed=0, k=20)
    assert len(paths(tr, "a")) == 20 and paths(tr, "b") == paths(train, "b", GOOD)  # b has 12: all of them
    assert "'b' has 12 good training images, fewer than k=20" in caplog.text


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"k": 2, "augment": "yes"}, "augment must be true or false"),
        ({"k": 2, "augment": True, "n_augment": 0}, "n_augment must be an integer >= 1"),
        ({"k": 2, "augmentations": "spin"}, "augmentations must name at least one of rotation"),
        ({"k": 2, "shots": 3}, "unexpected keyword argument 'shots'"),
        ({}, "missing 1 required keyword-only argument: 'k'"),
    ],
)
def test_few_shot_refuses_wrong_parameters(params, message):
    train, test = split()
    with pytest.raises(SettingError, match=message):
        apply_setting("few_shot", train, test, seed=0, params=params)


# -- few-shot augmentation ----------------------------------------------------------------------
def test_the_schedule_is_imiad_s():
    steps = variant_schedule(4)
    assert [s.angle for s in steps] == [0, 72, 144, 216, 288]
    assert [s.scale for s in steps] == [1.0, 0.875, 0.75, 0.625, 0.5]
    assert [s.translate for s in steps] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert [s.flips for s in steps] == [(), ("h",), ("v",), ("h", "v"), ("h?", "v?")]
    assert [s.brightness for s in steps] == pytest.approx([1.0, 0.5, 2 / 3 * 1.25, 7 / 6, 1.5])
    assert [s.perspective for s in steps] == [0.0, 0.125, 0.25, 0.375, 0.5]


@pytest.mark.parametrize("shape", [(9, 9, 3), (8, 8), (6, 6, 1)])
def test_rotation_variants_are_exact_quarter_turns(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    variants = fewshot_variants(img, 3, ["rotation"], seed=1, key="x.png")  # 0, 90, 180, 270 degrees
    assert variants[0] is img
    for i, v in enumerate(variants):
        assert v.shape == img.shape and v.dtype == img.dtype
        np.testing.assert_array_equal(v, np.rot90(img, -i))  # clockwise, as torchvision's affine


def test_rotation_by_72_degrees_matches_scikit_image():
    from skimage.transform import rotate

    img = np.zeros((41, 41), np.uint8)
    img[8:20, 12:30] = 200
    v = fewshot_variants(img, 4, ["rotation"])[1]
    ref = rotate(img, -72, order=0, preserve_range=True, mode="constant", cval=0).astype(np.uint8)
    assert (v != ref).mean() < 0.01  # nearest-neighbour sampling: a few border pixels may differ


def test_flips_scale_and_colour_follow_the_schedule():
    img = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    v = fewshot_variants(img, 4, ["flip"], seed=0, key="k")
    np.testing.assert_array_equal(v[1], img[:, ::-1])
    np.testing.assert_array_equal(v[2], img[::-1])
    np.testing.assert_array_equal(v[3], img[::-1, ::-1])
    # scale 0.5 about the centre: a constant image shrinks to the central half, zero around it
    flat = np.full((40, 40), 100, np.uint8)
    half = fewshot_variants(flat, 4, ["scale"])[4]
    rows = np.flatnonzero(half.any(1))
    assert 19 <= len(rows) <= 21 and abs(rows.mean() - 19.5) <= 0.5 and set(np.unique(half)) == {0, 100}
    # colour: brightness then contrast with the schedule's factor f (variant 1: f = 0.5)
    x = np.random.default_rng(2).random((6, 6)).astype(np.float32)
    f = variant_schedule(4)[1].brightness
    y = np.clip(f * x, 0, 1)
    expected = np.clip(f * y + (1 - f) * y.mean(), 0, 1)  # contrast blends with the mean grey
    np.testing.assert_allclose(augment_image(x, variant_schedule(4)[1], ["color_jitter"], seed=0), expected, atol=1e-6)


def test_translation_is_a_seeded_shift_within_the_schedule():
    img = np.random.default_rng(3).integers(1, 256, (20, 20), dtype=np.uint8)  # no zero pixel
    step = variant_schedule(4)[2]  # up to 25 % of the size: |shift| <= 5 px
    a = augment_image(img, step, ["translate"], seed=11)
    assert np.array_equal(a, augment_image(img, step, ["translate"], seed=11))
    assert any(not np.array_equal(a, augment_image(img, step, ["translate"], seed=s)) for s in range(5))
    found = []
    for dy in range(-5, 6):
        for dx in range(-5, 6):
            shifted = np.zeros_like(img)
            shifted[max(dy, 0) : 20 + min(dy, 0), max(dx, 0) : 20 + min(dx, 0)] = img[
                max(-dy, 0) : 20 + min(-dy, 0), max(-dx, 0) : 20 + min(-dx, 0)
            ]
            if np.array_equal(a, shifted):
                found.append((dy, dx))
    assert len(found) == 1  # exactly one shift in range reproduces the variant


def test_augmented_few_shot_is_lazy_deterministic_and_labelled_good():
    rng = np.random.default_rng(4)
    train = [
        Sample(f"mem://{i}", GOOD, "c", "good", image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        for i in range(6)
    ]
    types = "rotation+translate+perspective+flip+color_jitter+scale"
    tr, _ = few_shot(train, [], seed=5, k=2, augment=True, n_augment=4, augmentations=types)
    shots, _ = few_shot(train, [], seed=5, k=2)
    assert len(tr) == 2 * 5 and [tr[0], tr[5]] == shots  # each shot, then its 4 variants
    assert all(isinstance(s, AugmentedSample) and s.image is None for i, s in enumerate(tr) if i % 5)
    assert all(s.label == GOOD and s.category == "c" for s in tr)
    assert tr[1].path == f"{shots[0].path}#fewshot-aug1of5"
    again, _ = few_shot(train, [], seed=5, k=2, augment=True, n_augment=4, augmentations=types)
    for s, t in zip(tr, again):
        np.testing.assert_array_equal(s.load_image(), t.load_image())
    other, _ = apply_setting("few_shot", train, [], seed=6, params={"k": 2, "augment": True, "augmentations": types})
    assert not all(np.array_equal(s.load_image(), t.load_image()) for s, t in zip(tr, other))


# -- noisy ------------------------------------------------------------------------------------
# IM-IAD: n = int(ratio * n_clean), cut to int(0.75 * n_test_anomalies).
# a: 25 clean, 7 test defects (cap 5); b: 12 clean, 4 test defects (cap 3).
@pytest.mark.parametrize(
    "ratio, n_a, n_b",
    [
        (0.0, 0, 0),
        (0.05, 1, 0),  # int(1.25) = 1, int(0.6) = 0
        (0.1, 2, 1),  # int(2.5) = 2 (not rounded up), int(1.2) = 1
        (0.15, 3, 1),  # int(3.75) = 3, int(1.8) = 1
        (0.2, 5, 2),  # int(5.0) = 5, int(2.4) = 2
        (0.3, 5, 3),  # int(7.5) = 7 -> cap 5, int(3.6) = 3 -> cap 3
    ],
)
def test_noisy_counts_caps_and_no_overlap(ratio, n_a, n_b):
    train, test = split()
    tr, te = noisy(train, test, seed=0, ratio=ratio)
    injected = injected_noise(tr)
    assert len(paths(injected, "a")) == n_a and len(paths(injected, "b")) == n_b
    assert paths(tr, label=ANOMALOUS) == []  # the method sees good images only (the dataset's defects dropped)
    assert all(s.true_label == ANOMALOUS and s.defect_type == "scratch" and s.mask_path for s in injected)
    assert len(tr) == 25 + 12 + n_a + n_b
    assert not set(paths(tr)) & set(paths(te))  # no overlap
    assert sorted(paths(te) + paths(injected)) == sorted(paths(test))  # nothing lost
    assert set(paths(injected)) <= set(paths(test, label=ANOMALOUS))
    assert list(te) == [s for s in test if s.path not in set(paths(injected))]  # order kept


def test_noisy_is_deterministic_per_seed_and_nested_in_the_ratio():
    train, test = split()
    assert noisy(train, test, seed=2, ratio=0.1) == noisy(train, test, seed=2, ratio=0.1)
    draws = {tuple(paths(injected_noise(noisy(train, test, seed=s, ratio=0.2)[0]))) for s in range(6)}
    assert len(draws) > 1
    sets = [set(paths(injected_noise(noisy(train, test, seed=2, ratio=r)[0]))) for r in (0.05, 0.1, 0.15, 0.2)]
    assert sets[0] <= sets[1] <= sets[2] <= sets[3] and len(sets[3]) == 7


@pytest.mark.parametrize(
    "params", [{"ratio": -0.1}, {"ratio": 1.5}, {"ratio": "high"}, {"ratio": 0.1, "upper_ratio": 2}]
)
def test_noisy_refuses_wrong_parameters(params):
    with pytest.raises(SettingError, match="must be a number in"):
        apply_setting("noisy", *split(), seed=0, params=params)


# -- semi-supervised --------------------------------------------------------------------------
@pytest.mark.parametrize("k, n_a, n_b", [(1, 1, 1), (2, 2, 2), (4, 4, 3), (5, 5, 3), (8, 5, 3), (10, 5, 3)])
def test_semi_supervised_counts_caps_and_no_overlap(k, n_a, n_b):
    train, test = split()
    tr, te = semi_supervised(train, test, seed=0, k=k)
    moved = [s for s in tr if s.label == ANOMALOUS]
    assert len(paths(moved, "a")) == n_a and len(paths(moved, "b")) == n_b
    assert all(s.defect_type == "scratch" and s.true_label is None for s in moved)  # test defects, labels kept
    assert paths(tr, label=GOOD) == paths(train, label=GOOD)  # every good image; the dataset's own defects dropped
    assert not set(paths(tr)) & set(paths(te))
    assert sorted(paths(te) + paths(moved)) == sorted(paths(test))
    assert len(te) == len(test) - n_a - n_b


def test_semi_supervised_is_deterministic_per_seed_nested_and_warns_at_the_cap(caplog):
    train, test = split()
    assert semi_supervised(train, test, seed=4, k=2) == semi_supervised(train, test, seed=4, k=2)
    assert len({tuple(paths(semi_supervised(train, test, seed=s, k=2)[0], label=ANOMALOUS)) for s in range(6)}) > 1
    sets = [set(paths(semi_supervised(train, test, seed=4, k=k)[0], label=ANOMALOUS)) for k in (1, 2, 4, 5, 8, 10)]
    assert all(a <= b for a, b in itertools.pairwise(sets))
    with caplog.at_level(logging.WARNING, logger="iadkit.settings.semi"):
        semi_supervised(train, test, seed=0, k=4)
    assert "'b' has 4 test anomalies; at most 3 (75 %) may move: using 3, not k=4" in caplog.text


# -- combinations ---------------------------------------------------------------------------------
class Method:
    def __init__(self, name, supervision):
        self.name, self.supervision = name, supervision


def test_a_semi_supervised_method_without_labelled_defects_is_refused_in_one_line():
    train, test = split()
    devnet = Method("devnet", "semi-supervised")
    for name, params in [("vanilla", {}), ("few_shot", {"k": 4}), ("noisy", {"ratio": 0.2})]:
        tr, _ = apply_setting(name, train, test, seed=0, params=params)
        with pytest.raises(
            SettingError, match=f"devnet learns from labelled defects, but setting '{name}' gives it none"
        ) as err:
            check_combination(name, devnet, tr)
        assert "\n" not in str(err.value)
    tr, _ = semi_supervised(train, test, seed=0, k=2)
    assert check_combination("semi_supervised", devnet, tr) is None
    assert usable_training(devnet, tr) == tr


def test_an_unsupervised_method_is_noted_once_and_zero_shot_is_noted():
    train, test = split()
    tr, _ = semi_supervised(train, test, seed=0, k=2)
    note = check_combination("semi_supervised", Method("padim", "unsupervised"), tr)
    assert note == "padim is unsupervised: it trains on the good images only (4 labelled defects unused)"
    assert usable_training(Method("padim", "unsupervised"), tr) == [s for s in tr if s.label == GOOD]
    assert (
        check_combination("vanilla", Method("padim", "unsupervised"), apply_setting("vanilla", train, test, seed=0)[0])
        is None
    )
    assert "zero-shot" in check_combination("few_shot", Method("winclip", "zero-shot"), tr)


def test_parse_setting_reads_the_command_line_form():
    assert parse_setting("few_shot:k=4") == ("few_shot", {"k": 4})
    assert parse_setting("few_shot:k=2,augment=true,augmentations=rotation+flip") == (
        "few_shot",
        {"k": 2, "augment": True, "augmentations": "rotation+flip"},
    )
    assert parse_setting("noisy:ratio=0.1") == ("noisy", {"ratio": 0.1})
    assert parse_setting("semi_supervised:k=5") == ("semi_supervised", {"k": 5})
