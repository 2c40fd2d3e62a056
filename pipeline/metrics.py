"""Face verification and identification metrics in plain numpy.

Kept free of torch and of the data formats so the same functions score any embedder (the trained
model, dlib's reference ResNet) and so a test can check them against hand-computed values.
Scores are similarities: higher means "more likely the same person".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The one list of operating points: TAR@FAR in verification, identify's 1:1 thresholds (FAR), and
# the open-set figures and identify's 1:N thresholds (FPIR).
FAR_TARGETS = (1e-2, 1e-3, 1e-4)
FPIR_TARGETS = (1e-2, 1e-1)
# An operating point is reported only where the set holds this many false accepts at it: TAR at
# FAR 1e-3 on 500 impostor pairs would be TAR at zero false accepts, a figure of one pair.
MIN_FALSE_ACCEPTS = 10


def reachable(negatives: int, rate: float) -> bool:
    """Whether ``negatives`` impostor comparisons can measure a false-accept rate of ``rate``."""
    return negatives * rate >= MIN_FALSE_ACCEPTS - 1e-9


def smallest_reachable_rate(negatives: int) -> float:
    """The smallest false-accept rate ``negatives`` impostor comparisons can measure."""
    return MIN_FALSE_ACCEPTS / negatives if negatives else 1.0


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.shape}) and labels ({labels.shape}) differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if labels.all() or not labels.any():
        raise ValueError("need both same-identity and different-identity pairs")
    return scores, labels


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score, from (0, 0) to (1, 1).

    Point i accepts every pair with score >= thresholds[i]; ties move together, so the curve never
    credits an arbitrary order among equal scores.
    """
    scores, labels = _check_scores(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return fpr, tpr, thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; equals P(score_same > score_diff) + ties / 2)."""
    return float(np.trapezoid(tpr, fpr))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """Highest true-accept rate whose false-accept rate does not exceed ``far``."""
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where the false-accept and false-reject rates cross (linear interpolation)."""
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (accept nothing), ends at -1 or 0 (accept everything)
    i = int(np.argmax(diff <= 0))
    if i == 0:
        return float(fpr[0])
    d0, d1 = diff[i - 1], diff[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of "same if score > threshold".

    Candidates are the midpoints between neighbouring distinct scores plus one below and one above
    all of them; among equally good thresholds the smallest wins (a fixed, documented tie-break).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    u = np.unique(scores)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0, u[-1] + 1.0]
    # accuracy for every candidate at once: sorted scores + counts on each side
    s_pos = np.sort(scores[labels])
    s_neg = np.sort(scores[~labels])
    tp = s_pos.size - np.searchsorted(s_pos, cands, side="right")
    tn = np.searchsorted(s_neg, cands, side="right")
    acc = (tp + tn) / scores.size
    i = int(np.argmax(acc))
    return float(cands[i]), float(acc[i])


@dataclass(frozen=True)
class KFoldResult:
    accuracy: float  # mean over folds
    accuracy_std: float
    fold_accuracies: list[float]
    thresholds: list[float]


def kfold_accuracy(scores, labels, folds) -> KFoldResult:
    """LFW's protocol: for each fold, pick the threshold on the other folds, score this fold."""
    scores, labels = _check_scores(scores, labels)
    folds = np.asarray(folds).ravel()
    if folds.shape != scores.shape:
        raise ValueError("folds must give one fold id per pair")
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    accs, ths = [], []
    for k in ids:
        test = folds == k
        th, _ = best_threshold(scores[~test], labels[~test])
        accs.append(float(np.mean((scores[test] > th) == labels[test])))
        ths.append(th)
    return KFoldResult(float(np.mean(accs)), float(np.std(accs)), accs, ths)


def kfold_correct(scores, labels, folds) -> np.ndarray:
    """Per pair, right (1.0) or wrong (0.0) at the threshold :func:`kfold_accuracy` chose for its
    fold on the other folds: the mean per fold is that fold's accuracy."""
    scores, labels = _check_scores(scores, labels)
    folds = np.asarray(folds).ravel()
    kf = kfold_accuracy(scores, labels, folds)
    threshold = dict(zip(np.unique(folds).tolist(), kf.thresholds))
    return ((scores > np.array([threshold[f] for f in folds.tolist()])) == labels).astype(np.float64)


def tar_key(far: float) -> str:
    return f"tar_at_far_{rate_key(far)}"


def verification_metrics(scores, labels, folds) -> dict:
    """Every verification figure the evaluation reports, as plain floats. TAR at a FAR the pairs
    cannot reach (:func:`reachable`) is None; ``far_min_reachable`` says which FAR they can."""
    fpr, tpr, _ = roc_curve(scores, labels)
    kf = kfold_accuracy(scores, labels, folds)
    labels = np.asarray(labels).astype(bool)
    negatives = int((~labels).sum())
    out = {"accuracy": kf.accuracy, "accuracy_std": kf.accuracy_std, "auc": auc(fpr, tpr),
           "eer": eer(fpr, tpr)}
    for far in FAR_TARGETS:
        out[tar_key(far)] = tar_at_far(fpr, tpr, far) if reachable(negatives, far) else None
    out["far_min_reachable"] = smallest_reachable_rate(negatives)
    out["pairs_same"] = int(labels.sum())
    out["pairs_different"] = negatives
    return out


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A plot-sized ROC: keeps the corners of the staircase, evenly spaced on a log FPR axis."""
    if fpr.size <= max_points:
        return fpr, tpr
    grid = np.unique(np.r_[0.0, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1.0, max_points - 1)])
    idx = np.searchsorted(fpr, grid, side="right") - 1
    return fpr[idx], tpr[idx]


def enrol(identities: list[str], embeddings: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(sorted identity names, one unit template each): the normalised mean of an identity's
    photos, which is steadier than any one photo (and one comparison per person). The one
    enrolment: the evaluation's galleries (one image per identity, so the template is that
    image's embedding), `identify`, the 1:N thresholds (:mod:`pipeline.evaluate.thresholds`) and the
    overlap check all enrol with it."""
    names = sorted(set(identities))
    ids = np.asarray(identities)
    templates = np.stack([np.asarray(embeddings)[ids == n].mean(axis=0) for n in names])
    return names, l2_normalize(templates).astype(np.float32)


def identity_scores(gallery: np.ndarray, gallery_ids, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted identity names, P x I cosine scores): each probe against each identity's template
    (:func:`enrol`)."""
    names, templates = enrol(list(np.asarray(gallery_ids).tolist()), gallery)
    return np.asarray(names), (l2_normalize(probes) @ templates.T).astype(np.float64)


def identification_ranks(gallery: np.ndarray, gallery_ids, probes: np.ndarray, probe_ids) -> np.ndarray:
    """Rank (1 = best) of each probe's true identity among the enrolled identities.

    Embeddings are compared by cosine similarity with each identity's template (:func:`enrol`).
    Ties count against the probe (rank = 1 + identities scoring >= the true one), so a
    collapsed embedding cannot earn a perfect rank. Probes whose identity is not enrolled are an
    error: they have no right answer.
    """
    probe_ids = np.asarray(probe_ids)
    names, per_id = identity_scores(gallery, gallery_ids, probes)
    missing = sorted(set(probe_ids.tolist()) - set(names.tolist()))
    if missing:
        raise ValueError(f"{len(missing)} probe identities are not enrolled, e.g. {missing[:3]}")
    true_col = np.searchsorted(names, probe_ids)
    true_score = per_id[np.arange(per_id.shape[0]), true_col]
    others = per_id >= true_score[:, None]
    others[np.arange(per_id.shape[0]), true_col] = False
    return 1 + others.sum(axis=1)


def rate_key(rate: float) -> str:
    """How a rate names a metric or threshold key: 1e-2 -> '1e-2' (as in ``tar_at_far_1e-2``)."""
    return f"{rate:.0e}".replace("e-0", "e-")


def threshold_at_rate(impostor_scores: np.ndarray, rate: float) -> float:
    """The smallest threshold at which at most ``rate`` of the impostor scores are above it
    (a score must exceed the threshold to be accepted; ties stay rejected)."""
    s = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no impostor scores")
    k = int(np.floor(rate * s.size + 1e-9))
    return float(s[k]) if k < s.size else float(np.nextafter(s[-1], -np.inf))


@dataclass(frozen=True)
class Searches:
    """Open-set searches against one gallery: per mated search whether its true identity ranked
    first and the top score; per non-mated search (a stranger) the top score."""

    hit: np.ndarray
    top_mated: np.ndarray
    top_nonmated: np.ndarray


def open_set_searches(gallery: np.ndarray, gallery_ids, mated: np.ndarray, mated_ids,
                      nonmated: np.ndarray) -> Searches:
    names, mated_scores = identity_scores(gallery, gallery_ids, mated)
    _, nonmated_scores = identity_scores(gallery, gallery_ids, nonmated)
    hit = names[mated_scores.argmax(axis=1)] == np.asarray(mated_ids)
    return Searches(hit, mated_scores.max(axis=1), nonmated_scores.max(axis=1))


def open_set_figures(s: Searches, fpirs=FPIR_TARGETS) -> dict:
    """NIST FRVT 1:N figures: at the threshold where a share ``fpir`` of the non-mated searches
    (strangers) return any identity above it, the detection and identification rate (DIR) is the
    share of mated searches whose true identity ranks first AND scores above it. An FPIR the
    strangers cannot reach (:func:`reachable`) gives None."""
    out = {}
    for f in fpirs:
        key = rate_key(f)
        if reachable(s.top_nonmated.size, f):
            t = threshold_at_rate(s.top_nonmated, f)
            out[f"dir_at_fpir_{key}"] = float(np.mean(s.hit & (s.top_mated > t)))
            out[f"threshold_at_fpir_{key}"] = t
        else:
            out[f"dir_at_fpir_{key}"] = out[f"threshold_at_fpir_{key}"] = None
    out["rank1_mated"] = float(s.hit.mean())
    return out


def open_set_identification(gallery: np.ndarray, gallery_ids, mated: np.ndarray, mated_ids,
                            nonmated: np.ndarray, fpirs=FPIR_TARGETS) -> dict:
    """:func:`open_set_figures` of searching ``mated`` and ``nonmated`` probes in the gallery."""
    return open_set_figures(open_set_searches(gallery, gallery_ids, mated, mated_ids, nonmated), fpirs)


def cmc(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """Cumulative match characteristic: share of probes with rank <= r, for r = 1..max_rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no probes")
    return np.array([(ranks <= r).mean() for r in range(1, max_rank + 1)], dtype=np.float64)
