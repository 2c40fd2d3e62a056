"""Metrics against answers worked out by hand (the comments show the working)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import metrics


def _unit(deg: float) -> list[float]:
    r = np.deg2rad(deg)
    return [np.cos(r), np.sin(r)]


def test_gallery_rank1_and_cmc_hand_computed():
    # Enrolled: A at 0 deg, B at 90, C at 180. Cosine similarity = cos(angle between).
    gallery = np.array([_unit(0), _unit(90), _unit(180)])
    # a1 at 10: A cos10=.98 best -> rank 1.  a2 at 80: B cos10=.98 > A cos80=.17 -> rank 2.
    # b1 at 100: B cos10 best -> rank 1.     c1 at 260: C cos80=.17 > A cos100=-.17 > B -> rank 1.
    probes = np.array([_unit(10), _unit(80), _unit(100), _unit(260)])
    ranks = metrics.identification_ranks(gallery, ["A", "B", "C"], probes, ["A", "A", "B", "C"])
    assert ranks.tolist() == [1, 2, 1, 1]
    assert metrics.cmc(ranks, 3).tolist() == [0.75, 1.0, 1.0]


def test_identity_scores_mean_template_and_ties_count_against_probe():
    gallery = np.array([_unit(0), _unit(170), _unit(90)])
    # A has two images (0 and 170 deg), enrolled as one template at 85 deg (metrics.enrol, as
    # identify enrols): a probe at 85 deg is A's (rank 1) although B's image at 90 is nearer than
    # either of A's images; a probe at 160 deg, 10 deg from A's second image, is B's (75 vs 70).
    ranks = metrics.identification_ranks(gallery, ["A", "A", "B"], np.array([_unit(85), _unit(160)]), ["A", "A"])
    assert ranks.tolist() == [1, 2]
    names, templates = metrics.enrol(["A", "A", "B"], gallery)
    assert names == ["A", "B"] and np.allclose(templates, [_unit(85), _unit(90)], atol=1e-6)
    # A collapsed embedding (all equal) ties every identity: rank = number of identities, not 1.
    same = np.ones((3, 4))
    ranks = metrics.identification_ranks(same, ["A", "B", "C"], np.ones((2, 4)), ["A", "C"])
    assert ranks.tolist() == [3, 3]


def test_probe_identity_not_enrolled_is_refused():
    with pytest.raises(ValueError, match="not enrolled"):
        metrics.identification_ranks(np.eye(2), ["A", "B"], np.eye(2)[:1], ["Z"])


# Ten folds, one same-identity and one different-identity pair each. Same pairs score 0.9 except
# fold 0 (0.1, a hard positive); different pairs score 0.0 except fold 1 (0.5, a hard negative).
SAME = np.array([0.1] + [0.9] * 9)
DIFF = np.array([0.0, 0.5] + [0.0] * 8)
SCORES = np.r_[SAME, DIFF]
LABELS = np.r_[np.ones(10, bool), np.zeros(10, bool)]
FOLDS = np.r_[np.arange(10), np.arange(10)]


def test_ten_fold_accuracy_hand_computed():
    # Fold 0 held out: train = 9 x 0.9 same, 8 x 0.0 + 0.5 different -> best (smallest) threshold
    #   0.7 (midpoint 0.5..0.9); test: 0.1 same rejected (wrong), 0.0 diff rejected (right): 0.5.
    # Fold 1 held out: train = 0.1 + 8 x 0.9 same, 9 x 0.0 different -> threshold 0.05, perfect;
    #   test: 0.9 accepted (right), 0.5 diff accepted (wrong): 0.5.
    # Folds 2..9: train has both hard pairs, every threshold gets 17/18, smallest is 0.05;
    #   test: 0.9 accepted, 0.0 rejected: 1.0.  Mean = (0.5 + 0.5 + 8) / 10 = 0.9.
    kf = metrics.kfold_accuracy(SCORES, LABELS, FOLDS)
    assert kf.fold_accuracies == [0.5, 0.5] + [1.0] * 8
    assert kf.accuracy == pytest.approx(0.9)
    assert kf.thresholds[0] == pytest.approx(0.7)
    assert kf.thresholds[1:] == pytest.approx([0.05] * 9)


def test_roc_auc_eer_tar_hand_computed():
    # AUC = P(same > diff): nine 0.9s beat all ten diffs (90), 0.1 beats the nine 0.0s (9) -> 0.99.
    # At threshold 0.5: FAR .1 and FRR .1 -> EER 0.1. Ten impostor pairs reach no FAR below 1
    # (10 false accepts): TAR@FAR is None at every target.
    m = metrics.verification_metrics(SCORES, LABELS, FOLDS)
    assert m["auc"] == pytest.approx(0.99)
    assert m["tar_at_far_1e-2"] is m["tar_at_far_1e-3"] is m["tar_at_far_1e-4"] is None
    assert m["far_min_reachable"] == 1.0
    assert m["eer"] == pytest.approx(0.1)
    assert m["accuracy"] == pytest.approx(0.9)
    assert (m["pairs_same"], m["pairs_different"]) == (10, 10)


def test_roc_groups_ties_and_spans_corners():
    fpr, tpr, th = metrics.roc_curve([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1])
    # thresholds inf, 0.9, 0.5 (one same + one diff together), 0.2
    assert th[1:].tolist() == [0.9, 0.5, 0.2]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    # the tie contributes half: AUC = (1 + 0.5 + 1 + 1) / 4
    assert metrics.auc(fpr, tpr) == pytest.approx(0.875)


def test_eer_interpolates_between_points():
    # fnr - fpr: (0,0)->1, (0,.5)->.5, (.5,1)->-.5: crossing halfway between points 1 and 2.
    assert metrics.eer(np.array([0, 0, 0.5, 1]), np.array([0, 0.5, 1, 1])) == pytest.approx(0.25)


@pytest.mark.parametrize("scores,labels,match", [
    ([0.1, 0.2], [1, 1], "both"),
    ([0.1, np.nan], [1, 0], "NaN"),
    ([0.1], [1, 0], "differ"),
])
def test_bad_inputs_are_refused(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.roc_curve(scores, labels)


def test_thin_roc_keeps_ends_and_is_monotone():
    rng = np.random.default_rng(0)
    s = np.r_[rng.normal(1, 1, 3000), rng.normal(0, 1, 3000)]
    fpr, tpr, _ = metrics.roc_curve(s, np.r_[np.ones(3000), np.zeros(3000)])
    f2, t2 = metrics.thin_roc(fpr, tpr, 200)
    assert f2.size <= 200 and f2[0] == 0.0 and f2[-1] == 1.0 and t2[-1] == 1.0
    assert (np.diff(f2) >= 0).all() and (np.diff(t2) >= 0).all()


def test_threshold_at_rate_lets_through_at_most_that_share():
    s = np.arange(100) / 100  # 0.00 .. 0.99
    assert metrics.threshold_at_rate(s, 0.01) == 0.98  # only 0.99 is above it: 1 in 100
    assert metrics.threshold_at_rate(s, 0.1) == 0.89
    assert metrics.threshold_at_rate(s, 0.0) == 0.99  # nothing above
    assert metrics.threshold_at_rate(np.array([0.5, 0.5, 0.5, 0.2]), 0.5) == 0.5  # ties stay rejected
    with pytest.raises(ValueError):
        metrics.threshold_at_rate(np.array([]), 0.1)


def test_dir_at_fpir_hand_computed():
    # Enrolled: A at 0 deg, B at 90. Mated searches: a1 at 30 (A, cos30 = .866), a2 at 80 (A, but
    # B is closer: a miss), b1 at 95 (B, cos5 = .996), b2 at 150 (B, cos60 = .5).
    gallery = np.array([_unit(0), _unit(90)])
    mated = np.array([_unit(30), _unit(80), _unit(95), _unit(150)])
    # 100 strangers, 10 each of: best score cos25 = .906 (at 25, near A), cos40 = .766 (at 130,
    # near B), the other eight far from both (at 200..270: best score <= cos110 < 0).
    nonmated = np.array(([_unit(25), _unit(130)] + [_unit(a) for a in range(200, 280, 10)]) * 10)
    got = metrics.open_set_identification(gallery, ["A", "B"], mated, ["A", "A", "B", "B"], nonmated)
    # FPIR 10%: ten strangers of 100 may pass -> threshold .766 -> a1 (.866) and b1 (.996) found
    assert got["threshold_at_fpir_1e-1"] == pytest.approx(np.cos(np.deg2rad(40)))
    assert got["dir_at_fpir_1e-1"] == 0.5
    # FPIR 1% would be one stranger of 100: fewer than MIN_FALSE_ACCEPTS, so not reported
    assert got["threshold_at_fpir_1e-2"] is got["dir_at_fpir_1e-2"] is None
    assert got["rank1_mated"] == 0.75
    # with 1,000 strangers (the same 10 kinds, 100 each) FPIR 1% is reachable: 10 may pass ->
    # threshold .906 -> only b1
    got = metrics.open_set_identification(gallery, ["A", "B"], mated, ["A", "A", "B", "B"],
                                          np.concatenate([nonmated] * 10))
    assert got["threshold_at_fpir_1e-2"] == pytest.approx(np.cos(np.deg2rad(25)))
    assert got["dir_at_fpir_1e-2"] == 0.25


def test_tar_only_where_the_impostors_reach_it():
    # 1,000 impostor pairs scoring 0.000, 0.001, ..., 0.999; 100 same pairs: 30 at 0.995, 70 at 0.5.
    # FAR 1e-2 allows 10 false accepts: threshold 0.995 takes 5 impostors (0.995..0.999) and the 30
    # -> TAR 0.3. FAR 1e-3 (1 false accept) and 1e-4 need 10,000 / 100,000 impostors: None.
    scores = np.r_[np.arange(1000) / 1000, [0.995] * 30, [0.5] * 70]
    labels = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    m = metrics.verification_metrics(scores, labels, np.arange(scores.size) % 10)
    assert m["tar_at_far_1e-2"] == pytest.approx(0.3)
    assert m["tar_at_far_1e-3"] is None and m["tar_at_far_1e-4"] is None
    assert m["far_min_reachable"] == pytest.approx(0.01)
    assert metrics.reachable(1000, 1e-2) and not metrics.reachable(999, 1e-2)
