"""1:N thresholds: exact FPIR per gallery size, identify's enrolment, the grid identify reads."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import enrol, l2_normalize
from pipeline.evaluate.thresholds import (ThresholdError, calibrate, describe, fpir_at, searches, split_enrolment,
                                          threshold_at_fpir, threshold_for)


def test_fpir_at_gallery_size_by_hand():
    """One stranger search meeting 3 people with scores 0.1, 0.5, 0.9; threshold 0.6 (2 below):
    a random gallery of 1 of them returns somebody with prob. 1 - C(2,1)/C(3,1) = 1/3, of 2:
    1 - C(2,2)/C(3,2) = 2/3, of all 3: 1. (Planted defects: 1 - (1 - FAR1)^n gives 0.56 at n=2,
    the max over everyone gives 1 at every n.)"""
    scores = np.array([[0.1, 0.5, 0.9, 0.99]])
    valid = np.array([[True, True, True, False]])  # the last column is the searcher's own person
    assert fpir_at(scores, valid, 0.6, 1) == pytest.approx(1 / 3)
    assert fpir_at(scores, valid, 0.6, 2) == pytest.approx(2 / 3)
    assert fpir_at(scores, valid, 0.6, 3) == pytest.approx(1.0)
    assert fpir_at(scores, valid, 0.95, 3) == 0.0  # the own score never counts as a stranger's
    # the threshold for a target: the smallest score with FPIR <= target (accepting needs > t)
    assert threshold_at_fpir(scores, valid, 1 / 3, 1) == 0.5
    assert threshold_at_fpir(scores, valid, 0.0, 3) == 0.9
    two = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]])
    assert fpir_at(two, np.ones_like(two, bool), 0.35, 1) == pytest.approx((2 / 3 + 1 / 3) / 2)  # 1 and 2 below


def test_enrolment_is_a_seeded_half_of_each_person():
    ids = ["a"] * 4 + ["b"] * 3 + ["c"]
    enrolled, probe = split_enrolment(ids, seed=0)
    assert enrolled[:4].sum() == 2 and enrolled[4:7].sum() == 1 and not enrolled[7] and (probe == ~enrolled).all()
    assert (split_enrolment(ids, seed=0)[0] == enrolled).all()
    assert any((split_enrolment(ids, seed=s)[0] != enrolled).any() for s in range(1, 5))


def test_templates_are_the_normalised_mean_of_each_persons_photos_by_hand():
    """a's photos (1,0,0) and (0,1,0) enrol as (1,1,0)/sqrt 2, so a probe (1,1,0)/sqrt 2 of a scores
    1.0 against a, where a first-photo template would give 0.71 (the planted defect)."""
    r = 1 / np.sqrt(2)
    ids = ["b", "a", "a", "b"]
    emb = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    names, templates = enrol(ids, emb)
    assert names == ["a", "b"]
    np.testing.assert_allclose(templates, [[r, r, 0], [0, 0, 1]], atol=1e-6)
    # through the calibration's searches: 2 photos each, one enrols (seeded), the other searches
    ids = ["a", "a", "a", "a", "b", "b"]
    emb = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32)
    s = searches(emb, np.array([[r, r, 0]] * 6, np.float32), ids, seed=0)
    enrolled, _ = split_enrolment(ids, seed=0)
    a_mean = emb[:4][enrolled[:4]].mean(axis=0)
    assert s.scores[0, 0] == pytest.approx(float(np.array([r, r, 0]) @ (a_mean / np.linalg.norm(a_mean))), abs=1e-6)


def _people(n_people: int, photos: int, noise: float, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(n_people, dim)))
    ids, emb = [], []
    for k in range(n_people):
        for _ in range(photos):
            ids.append(f"p{k:03d}")
            emb.append(centres[k] + noise * rng.normal(size=dim) / np.sqrt(dim))
    return ids, l2_normalize(np.array(emb)).astype(np.float32)


def test_calibration_meets_its_targets_and_grows_with_the_gallery():
    ids, emb = _people(120, 4, noise=1.2)
    out = calibrate(emb, emb, ids, seed=0, source="synthetic", probes="as given", replicates=200)
    assert (out["people"], out["enrolled"], out["mated_searches"], out["nonmated_searches"]) == (120, 120, 240, 480)
    assert out["measured_up_to_gallery_size"] == 119
    t = out["fpir"]["1e-1"]
    grid = [t[k] for k in ("1", "2", "5", "10", "20", "50", "100")]
    assert all(a <= b for a, b in zip(grid, grid[1:])) and grid[0] < grid[-1]  # more people: a higher bar
    assert out["fpir"]["1e-2"]["1"] is None  # 480 stranger searches x 1e-2 = 4.8 false positives: out of reach
    check = out["at_gallery_size"]["1e-1"]
    assert check["fpir"] <= 0.1 and check["fpir_ci"]["low"] <= check["fpir"] <= check["fpir_ci"]["high"]
    assert 0.0 <= check["fnir"] <= 1.0 and check["fnir_ci"] is not None
    assert out["at_gallery_size"]["1e-2"] is None
    # above the people it has, the grid is extrapolated, and says so
    tt, n, extrapolated = threshold_for({"one_to_n": out}, "1e-1", 150)
    assert (n, extrapolated) == (200, True) and tt == out["fpir"]["1e-1"]["200"]
    tt, n, extrapolated = threshold_for({"one_to_n": out}, "1e-1", 40)
    assert (tt, n, extrapolated) == (t["50"], 50, False)
    assert "yours: 40" in describe({"one_to_n": out}, "1e-1", 40)
    with pytest.raises(ThresholdError, match="out of reach"):
        threshold_for({"one_to_n": out}, "1e-2", 10)
    with pytest.raises(ThresholdError, match="--fpir 1e-5"):
        threshold_for({"one_to_n": out}, "1e-5", 10)
    with pytest.raises(ThresholdError, match="at least 2"):
        calibrate(emb[:4], emb[:4], ids[:4], seed=0, source="one person", probes="as given")


def test_masked_probes_search_raw_templates():
    """Probes come from their own array (the masked twins on validation): a probe array that
    hides who people are raises FNIR to chance while the enrolment stays as it was."""
    ids, emb = _people(60, 4, noise=0.5)
    good = calibrate(emb, emb, ids, seed=0, source="s", probes="as given", replicates=50)
    rng = np.random.default_rng(1)
    hidden = l2_normalize(rng.normal(size=emb.shape)).astype(np.float32)
    bad = calibrate(emb, hidden, ids, seed=0, source="s", probes="hidden", replicates=50)
    assert good["at_gallery_size"]["1e-1"]["fnir"] < 0.1 < 0.8 < bad["at_gallery_size"]["1e-1"]["fnir"]


def test_thresholds_set_on_some_people_are_checked_once_on_others():
    """Validation's thresholds on other people of the same kind: the FPIR they give there is
    near the target, taken from the grid at the first size >= the other set's gallery size."""
    from pipeline.evaluate.thresholds import check_thresholds

    ids, emb = _people(150, 4, noise=1.2, seed=0)
    entry = {"one_to_n": calibrate(emb, emb, ids, seed=0, source="A", probes="as given", replicates=50)}
    ids_b, emb_b = _people(70, 4, noise=1.2, seed=1)
    out = check_thresholds(entry, emb_b, emb_b, ids_b, seed=0, replicates=200, level=0.95)
    c = out["1e-1"]
    assert out["gallery_size"] == 69 and c["set_for_gallery_size"] == 100 and c["extrapolated"] == 0
    assert c["threshold"] == entry["one_to_n"]["fpir"]["1e-1"]["100"]
    assert c["fpir_ci"]["low"] <= 0.1 + 0.05 and c["fpir"] <= 0.2
    assert out["1e-2"] is None  # the grid holds no reachable 1e-2 threshold: 600 searches x 1e-2 < 10
