"""How far synthetic masked faces are from real ones: how well a classifier tells them apart, on
samples it never saw, looking at the mask region only (50% = indistinguishable).

Every sample (a photo, its 68 landmarks, its mask region) is warped to one frame: the lower face
of the mask templates (:func:`pipeline.mask.bank.to_frame`, the anchors every mask is warped over),
so pose and face size are gone, then shrunk to ``CROP``. Outside the mask region, dilated by
``BAND`` frame pixels, everything is mid grey: eyes, hair, background and who the person is are
not shown; the region's outline and the thin band where the mask meets the skin are (a pasted
edge is one of the things that looks fake).

The classifier reads what tells a drawn mask from a photographed one (:func:`features`): colour
and its spread, fine and medium texture (grain, weave, folds), gradient statistics and a coarse
histogram of oriented gradients (pleats, seams, prints), the light across the mask (a plane fitted
to its luminance and what is left), the edge against the skin, and the region's shape. An L2
logistic regression on them (:func:`separability`) is scored by k-fold cross validation, so each
sample is judged once by a model that never saw it: the figure is the out-of-fold accuracy on
balanced classes, with a bootstrap interval over samples, and AUC. A few hundred photos a side is
what there is, too few to train a network to discriminate from scratch; these features need no
more (tests/test_mask_realism.py plants a flat-painted mask and checks it is found).

Confounds it cannot remove (say them with the figure): the two sides come from different photo
collections (camera, JPEG, resolution, light: RMFD's web photos against LFW's news photos), and
the band of skin shows their people; the same classifier on the same photos' eye band
(:func:`eye_crop`, no mask in it) measures that collection gap alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.bootstrap import interval
from pipeline.metrics import auc, roc_curve

CROP = (106, 98)  # (w, h): the templates' frame (318 x 294) shrunk 3x
BAND = 6  # frame pixels around the mask region that stay visible (its edge against the skin)
GREY = 128.0
EYE_CROP = (64, 24)  # (w, h) of the eye band


@dataclass(frozen=True)
class Separability:
    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    n_real: int
    n_synthetic: int
    scores: np.ndarray  # out-of-fold P(real) per sample, reals first

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4),
                "accuracy_ci": [round(self.accuracy_ci[0], 4), round(self.accuracy_ci[1], 4)],
                "auc": round(self.auc, 4), "n_real": self.n_real, "n_synthetic": self.n_synthetic}


def mask_crop(rgb: np.ndarray, landmarks: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The mask region of one photo in the common frame: CROP[1] x CROP[0] x 4 float32 in [0, 1],
    RGB (grey beyond the region's band) and the region itself."""
    from pipeline.mask.bank import to_frame

    rgba = to_frame(rgb, landmarks, (region > 0).astype(np.float32) * 255.0)
    inside = (rgba[..., 3] > 127).astype(np.uint8)
    keep = cv2.dilate(inside, np.ones((2 * BAND + 1, 2 * BAND + 1), np.uint8))
    out = np.dstack([np.where(keep[..., None] > 0, rgba[..., :3], GREY), inside * 255.0]).astype(np.float32)
    return cv2.resize(out, CROP, interpolation=cv2.INTER_AREA) / 255.0


def eye_crop(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The band from the brows to the lower eyelids, eyes level at fixed places: the control, which
    holds no mask (EYE_CROP[1] x EYE_CROP[0] x 3 float32 in [0, 1])."""
    L = np.asarray(landmarks, np.float64)
    left, right = L[36:42].mean(0), L[42:48].mean(0)
    w, h = EYE_CROP
    dst = np.array([[0.25 * w, 0.62 * h], [0.75 * w, 0.62 * h]])
    m, _ = cv2.estimateAffinePartial2D(np.array([left, right]), dst)
    out = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    return out.astype(np.float32) / 255.0


def _stats(values: np.ndarray) -> list[float]:
    return [float(values.mean()), float(values.std())] if values.size else [0.0, 0.0]


def features(crop: np.ndarray) -> np.ndarray:
    """What tells a drawn mask from a photographed one, from a crop of :func:`mask_crop` (H x W x 4:
    RGB and the region) or :func:`eye_crop` (H x W x 3: the whole crop is the region)."""
    rgb = np.ascontiguousarray(crop[..., :3], np.float32)
    region = (crop[..., 3] > 0.5) if crop.shape[2] == 4 else np.ones(crop.shape[:2], bool)
    kernel = np.ones((3, 3), np.uint8)
    inside = cv2.erode(region.astype(np.uint8), kernel, iterations=2) > 0
    if inside.sum() < 16:
        inside = region
    band = (cv2.dilate(region.astype(np.uint8), kernel, iterations=2) > 0) & ~inside
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    g = lab[..., 0] / 100.0
    f: list[float] = []
    for c in range(3):  # colour and its spread
        f += _stats(lab[..., c][inside] / 100.0)
    b1, b4 = cv2.GaussianBlur(g, (0, 0), 1.0), cv2.GaussianBlur(g, (0, 0), 4.0)
    f += [float((g - b1)[inside].std()), float((b1 - b4)[inside].std()),  # grain / weave, folds
          float(np.abs(cv2.Laplacian(g, cv2.CV_32F))[inside].mean())]
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
    mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
    hist = np.histogram(np.log1p(50 * mag[inside]), bins=8, range=(0, 4))[0] / max(inside.sum(), 1)
    f += hist.tolist()
    f += [float(mag[band].mean() / max(mag[inside].mean(), 1e-6)) if band.any() else 0.0]  # the edge
    ys, xs = np.nonzero(inside)  # the light across the mask: a plane, and what is left
    design = np.stack([xs / g.shape[1], ys / g.shape[0], np.ones(len(xs))], 1)
    coef, *_ = np.linalg.lstsq(design, g[inside], rcond=None)
    f += [float(coef[0]), float(coef[1]), float((g[inside] - design @ coef).std())]
    area = float(region.mean())  # the region's shape
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    rows = np.flatnonzero(region.any(1))
    f += [area, perimeter ** 2 / max(region.sum(), 1) / 100.0,
          rows[0] / g.shape[0] if rows.size else 0.0, rows[-1] / g.shape[0] if rows.size else 0.0]
    cells = 4  # oriented gradients, 4 x 4 cells x 6 orientations, inside the region
    h, w = g.shape
    for i in range(cells):
        for j in range(cells):
            sl = (slice(i * h // cells, (i + 1) * h // cells), slice(j * w // cells, (j + 1) * w // cells))
            weights = (mag[sl] * inside[sl]).ravel()
            hog = np.histogram(ang[sl].ravel(), bins=6, range=(0, np.pi), weights=weights)[0]
            f += (hog / max(inside[sl].sum(), 1)).tolist()
    return np.array(f, np.float64)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """L2 logistic regression by Newton's method (x standardised, last column the intercept)."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def separability(real: np.ndarray, synthetic: np.ndarray, *, folds: int = 5, l2: float = 10.0,
                 seed: int = 0, replicates: int = 1000, level: float = 0.95) -> Separability:
    """Out-of-fold accuracy of a logistic regression on :func:`features` telling ``real`` from
    ``synthetic`` crops; the larger side is cut to the smaller (first samples kept), so chance is
    50%. Deterministic: the folds and the bootstrap are seeded, the fit has no randomness."""
    n = min(len(real), len(synthetic))
    if n < folds:
        raise ValueError(f"{n} samples a side: fewer than the {folds} folds")
    x = np.array([features(c) for c in [*real[:n], *synthetic[:n]]])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    rng = np.random.default_rng(seed)
    fold = np.empty(2 * n, np.int64)
    for side in (np.arange(n), np.arange(n, 2 * n)):  # stratified: each fold half real
        fold[side] = rng.permutation(np.arange(n) % folds)
    scores = np.zeros(2 * n)
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-9
        z = lambda a: np.hstack([(a - mu) / sd, np.ones((len(a), 1))])  # noqa: E731
        w = _logistic(z(x[tr]), y[tr], l2)
        scores[te] = 1.0 / (1.0 + np.exp(-np.clip(z(x[te]) @ w, -30, 30)))
    right = ((scores >= 0.5) == (y == 1)).astype(np.float64)
    ci = interval(_resampled_means(right, n, seed + 1, replicates), level)
    fpr, tpr, _ = roc_curve(scores, y == 1)
    return Separability(float(right.mean()), (ci["low"], ci["high"]), auc(fpr, tpr), n, n, scores)


def _resampled_means(right: np.ndarray, n: int, seed: int, replicates: int) -> np.ndarray:
    """Bootstrap means of per-sample 0/1 rows laid out as n reals then n synthetic, each side
    resampled on its own (classes stay balanced)."""
    rng = np.random.default_rng(seed)
    return np.array([right[np.concatenate([rng.integers(0, n, n), n + rng.integers(0, n, n)])].mean()
                     for _ in range(replicates)])


def paired_difference(a: Separability, b: Separability, *, seed: int = 0, replicates: int = 1000,
                      level: float = 0.95) -> dict:
    """accuracy(a) - accuracy(b) with an interval, for two conditions scored on the same reals and
    the same synthetic faces (the i-th synthetic sample of each is the same person's photo): one
    bootstrap draw of samples serves both."""
    n = a.n_real
    if (a.n_real, a.n_synthetic) != (b.n_real, b.n_synthetic):
        raise ValueError("paired conditions need the same samples")
    y = np.concatenate([np.ones(n), np.zeros(n)])
    ra = ((a.scores >= 0.5) == (y == 1)).astype(np.float64)
    rb = ((b.scores >= 0.5) == (y == 1)).astype(np.float64)
    ci = interval(_resampled_means(ra - rb, n, seed + 2, replicates), level)  # one draw serves both
    return {"diff": round(float(ra.mean() - rb.mean()), 4), "ci": [round(ci["low"], 4), round(ci["high"], 4)]}
