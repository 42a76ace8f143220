"""DNE and the continual memory bank on the synthetic categories: DNE's statistics and scores
against scikit-learn, the bank routing each test image to its own task (no task id given),
and neither forgetting a task it has learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from iadkit.data.transforms import ImageSet
from iadkit.metrics.image import image_auroc
from iadkit.model import Model

SIZE = 64
CATEGORIES = ("fabric", "metal", "wood")


@pytest.fixture(scope="module")
def tasks(synthetic):
    return {c: synthetic(c) for c in CATEGORIES}


def _embeddings(model: Model, samples) -> np.ndarray:
    images = torch.cat([b.images for b in ImageSet(list(samples), model.preprocess).batches(16)])
    with torch.no_grad():
        return model.detector.embed(images).numpy()


def test_dne_keeps_ledoit_wolf_statistics_per_task_and_scores_by_mahalanobis(tasks):
    torch.set_num_threads(1)
    model = Model.create("dne", image_size=SIZE).fit(tasks["fabric"].train, calibration_fraction=0.0, progress=False)
    det = model.detector
    z = _embeddings(model, tasks["fabric"].train)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)  # L2-normalised, as DNE
    lw = LedoitWolf().fit(z)
    np.testing.assert_allclose(det.means_[0].numpy(), z.mean(0), atol=1e-6)
    np.testing.assert_allclose(det.covariances_[0].numpy(), lw.covariance_, rtol=1e-4, atol=1e-7)
    # one task: the joint Gaussian is the task's own; score = Mahalanobis distance (sklearn's is squared)
    test = tasks["fabric"].test
    expected = np.sqrt(lw.mahalanobis(_embeddings(model, test)))
    np.testing.assert_allclose(model.predict(test).scores, expected, rtol=2e-3)

    model.partial_fit(tasks["metal"].train, calibration_fraction=0.0, progress=False)
    assert det.n_tasks == 2 and det.counts_.tolist() == [len(tasks["fabric"].train), len(tasks["metal"].train)]
    np.testing.assert_allclose(det.means_[0].numpy(), z.mean(0), atol=1e-6)  # task 0 kept as it was
    # nearest_task: the smaller of the two tasks' own Mahalanobis distances
    lw_metal = LedoitWolf().fit(_embeddings(model, tasks["metal"].train))
    e = _embeddings(model, test)
    both = np.sqrt(np.minimum(lw.mahalanobis(e), lw_metal.mahalanobis(e)))
    model.detector.set_params(scoring="nearest_task")
    np.testing.assert_allclose(model.predict(test).scores, both, rtol=2e-3)
    # joint: the Gaussian refitted on replays of task 0 and task 1's embeddings differs from both
    model.detector.set_params(scoring="joint")
    joint = model.predict(test).scores
    assert not np.allclose(joint, expected) and np.isfinite(joint).all()


@pytest.fixture(scope="module")
def bank(tasks):
    torch.set_num_threads(1)
    model = Model.create("continual_bank", image_size=SIZE, coreset_ratio=0.1, key_size=64)
    model.fit(tasks["fabric"].train, calibration_fraction=0.0, progress=False)
    after_first = model.predict(tasks["fabric"].test).scores
    for c in CATEGORIES[1:]:
        model.partial_fit(tasks[c].train, calibration_fraction=0.0, progress=False)
    return model, after_first


def test_the_bank_routes_each_test_image_to_its_own_task(bank, tasks):
    model, _ = bank
    det = model.detector
    assert det.n_tasks == 3 and det.keys_.shape[0] == 3 * 64
    for t, c in enumerate(CATEGORIES):
        images = torch.cat([b.images for b in ImageSet(list(tasks[c].test), model.preprocess).batches(16)])
        routed = det.route(images)
        assert (routed == t).float().mean() == 1.0, f"{c}: routed to {routed.tolist()}"
        assert det.task_bank(t).shape[0] == int(det.bank_offsets_[t + 1] - det.bank_offsets_[t]) > 0


def test_the_bank_does_not_forget_a_learned_task(bank, tasks):
    model, after_first = bank
    test = tasks["fabric"].test
    now = model.predict(test).scores
    np.testing.assert_allclose(now, after_first, rtol=1e-5)  # routed to task 0: the same bank, the same scores
    labels = np.array([s.label for s in test])
    assert image_auroc(labels, now) >= 0.8


def test_the_bank_with_a_fixed_size_per_task(tasks):
    torch.set_num_threads(1)
    model = Model.create("continual_bank", image_size=SIZE, bank_size=100, key_size=20)
    model.fit(tasks["fabric"].train, calibration_fraction=0.0, progress=False)
    model.partial_fit(tasks["metal"].train, calibration_fraction=0.0, progress=False)
    det = model.detector
    assert det.bank_offsets_.tolist() == [0, 100, 200] and det.key_offsets_.tolist() == [0, 20, 40]
    # the key is a subset of its task's bank (a coreset of the coreset)
    bank0 = det.task_bank(0)
    assert torch.cdist(det.task_key(0), bank0, compute_mode="donot_use_mm_for_euclid_dist").amin(1).max() < 1e-5


@pytest.mark.parametrize("name", ["dne", "continual_bank"])
def test_a_saved_model_learns_the_next_task_later(name, tasks, tmp_path):
    """A line keeps its model file and teaches it the next product months later: the loaded
    model continues exactly as the one that never left memory."""
    torch.set_num_threads(1)
    model = Model.create(name, image_size=SIZE).fit(tasks["fabric"].train, calibration_fraction=0.0, progress=False)
    loaded = Model.load(model.save(tmp_path / f"{name}.iad"))
    for m in (model, loaded):
        m.partial_fit(tasks["metal"].train, calibration_fraction=0.0, progress=False)
    test = list(tasks["fabric"].test) + list(tasks["metal"].test)
    np.testing.assert_allclose(loaded.predict(test).scores, model.predict(test).scores, rtol=1e-5)
    assert loaded.info["n_tasks"] == model.info["n_tasks"] == 2
