"""A mask bank from real masked photos: each real mask cut out with its alpha and warped to the
procedural templates' frame, so :func:`pipeline.mask.overlay.overlay_mask` puts it on any face.

Per photo (no identities needed):

1. **Geometry.** RetinaFace, the detector that still finds masked faces, gives the subject's five
   points; dlib's 68-point predictor runs in the box they imply (the mask stage's RetinaFace route).
   Under a mask the nose and mouth points are the shape model's guess, constrained by the eyes,
   brows and jaw it does see: good enough to place the lower face, which is all the cut needs.
2. **Segmentation: GrabCut seeded by the face geometry.** A real mask is one large region over the
   nose, mouth and chin whose colour differs from the skin above it; GrabCut (a colour model per
   side and a contrast-sensitive boundary) is given what the geometry makes certain: the mouth and
   chin are mask, the eyes, brows and forehead and everything outside the lower-face ring are not,
   and the ring itself is left for it to decide. It needs no training data (none with mask
   outlines is at hand), follows folds, straps and prints that a colour threshold would split, and
   its failures are caught by the checks below rather than trusted.
3. **Quality checks** (an entry is kept only if it passes all; each rejection says which failed):
   one clear subject face, big enough; the cut covers the nose and the mouth; it is one solid
   region (solidity) of plausible size against the lower face; it does not look like the skin
   between the brows (else GrabCut took skin, or there is no mask); little skin-coloured area
   inside it (a hand over the mask, a mask pulled down); and, warped to the frontal frame, it is
   close to its own mirror image (half of it hidden by a phone or a hand is not).
4. **Warp** of the photo's pixels and the cut's alpha from the photo's anchors to the canonical
   anchors, piecewise over the same triangles the overlay uses: a bank entry is a
   :class:`~pipeline.mask.templates.Template` like the procedural ones. The photo's own light
   (its low frequencies over the mask) is divided out, so that the overlay's light matching puts
   the target face's light on it once; folds, prints and seams are finer than that and stay.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.align.geometry import subject_index
from pipeline.config import BANK_MASK_TYPE
from pipeline.mask.landmarks import CANONICAL_112
from pipeline.mask.overlay import LUMA, smooth_light, warp_template
from pipeline.mask.templates import (SIZE, Template, anchor_points, canonical_anchors, outline_points, to_template,
                                     triangles)

# quality thresholds, set by looking at the cuts on ../shared/data/rmfd photos and checked against
# cuts whose truth is known (LFW faces wearing procedural masks: tests/test_mask_bank.py)
MIN_EYE_DISTANCE = 28.0  # px between the eye centres: smaller faces give blurry, blocky entries
MAX_OTHER_FACE = 0.5  # a second face at least this large (area ratio) makes the subject unclear
MIN_NOSE_COVER = 0.6  # share of the lower nose (nostrils, tip) under the cut
MIN_MOUTH_COVER = 0.9  # share of the mouth under the cut
MIN_SOLIDITY = 0.85  # cut area / its convex hull's
AREA_RANGE = (0.55, 1.35)  # cut area / the lower-face outline's (outline_points)
MIN_SKIN_DISTANCE = 18.0  # Lab distance (8-bit units) of the cut's median from the skin between the brows
MAX_SKIN_INSIDE = 0.12  # share of the cut whose colour is the skin's ...
SKIN_NEAR = 12.0  # ... within this Lab distance (8-bit units) of the skin's median
MIN_SYMMETRY = 0.65  # IoU of the warped cut with its mirror image: a part hidden (a phone, a hand) or torn off
SCORE_NAMES = ("nose_cover", "mouth_cover", "solidity", "area_ratio", "skin_distance", "skin_inside", "symmetry")


@dataclass
class BankEntry:
    source: str  # the photo, relative to the bank's folder
    kept: bool
    reason: str  # why it was rejected ("" when kept)
    scores: dict = field(default_factory=dict)
    template: Template | None = None
    landmarks: np.ndarray | None = None  # the subject's 68 points (dlib's predictor in RetinaFace's box)
    cut: np.ndarray | None = None  # uint8 0/1, photo size
    photo_cut: np.ndarray | None = None  # the photo with the cut outlined (contact sheets)


def _poly_mask(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)


def segment_mask(rgb: np.ndarray, L: np.ndarray, iterations: int = 4) -> np.ndarray:
    """The mask region (uint8 0/1, image size) by GrabCut seeded from 68 landmarks ``L``."""
    h, w = rgb.shape[:2]
    ring_a = outline_points(L)
    centre = 0.5 * (L[29] + L[57])
    ring_b = ring_a + 0.22 * (ring_a - centre)
    labels = np.full((h, w), cv2.GC_BGD, np.uint8)
    labels[_poly_mask((h, w), ring_b) > 0] = cv2.GC_PR_BGD
    labels[_poly_mask((h, w), ring_a) > 0] = cv2.GC_PR_FGD
    # certain mask: the mouth and the chin below it, shrunk towards their centre
    mouth_chin = np.vstack([L[48:60], L[7:10]])
    c = mouth_chin.mean(0)
    labels[_poly_mask((h, w), c + 0.7 * (mouth_chin - c)) > 0] = cv2.GC_FGD
    # certain skin or background: the eyes and everything above the lower eyelids
    eye_y = int(np.floor(max(L[40, 1], L[41, 1], L[46, 1], L[47, 1])))
    labels[: max(eye_y, 0)] = cv2.GC_BGD
    x0, y0 = np.maximum(np.floor(ring_b.min(0)).astype(int) - 8, 0)
    x1, y1 = np.minimum(np.ceil(ring_b.max(0)).astype(int) + 8, [w, h])
    y0 = min(y0, max(eye_y - 12, 0))
    roi = (slice(y0, y1), slice(x0, x1))
    sub = np.ascontiguousarray(labels[roi])
    if not (sub == cv2.GC_FGD).any() or not ((sub == cv2.GC_BGD) | (sub == cv2.GC_PR_BGD)).any():
        return np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's RNG: fixed, so entries repeat
    cv2.grabCut(np.ascontiguousarray(rgb[roi][..., ::-1]), sub, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    out = np.zeros((h, w), np.uint8)
    out[roi] = ((sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)).astype(np.uint8)
    # the one region holding the mouth, holes filled
    n, comp = cv2.connectedComponents(out)
    if n > 2:
        mouth = comp[int(round(L[62, 1])), int(round(L[62, 0]))] if 0 <= L[62, 1] < h and 0 <= L[62, 0] < w else 0
        out = (comp == mouth).astype(np.uint8) if mouth else out
    contours, _ = cv2.findContours(out, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(out)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def quality(rgb: np.ndarray, L: np.ndarray, cut: np.ndarray) -> tuple[str, dict]:
    """("" or the first failed check, the scores of every check)."""
    h, w = rgb.shape[:2]
    area = float(cut.sum())
    nose = _poly_mask((h, w), np.vstack([L[31:36], L[30:31]]))
    mouth = _poly_mask((h, w), L[48:60])
    outline = _poly_mask((h, w), outline_points(L))
    contours, _ = cv2.findContours(cut, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.vstack(contours)) if contours else None
    hull_area = float(cv2.contourArea(hull)) if hull is not None else 0.0
    # skin a mask never covers: between the brows and down the top of the nose bridge, clear of the cut
    brows = 0.5 * (L[21] + L[22])
    half = max(0.35 * abs(L[22, 0] - L[21, 0]), 2.0)
    skin = np.zeros((h, w), np.uint8)
    cv2.rectangle(skin, (int(round(brows[0] - half)), int(round(brows[1] - half))),
                  (int(round(brows[0] + half)), int(round(L[28, 1]))), 1, thickness=cv2.FILLED)
    skin &= (cv2.dilate(cut, np.ones((7, 7), np.uint8)) == 0).astype(np.uint8)
    lab = _lab(rgb)
    scores = {"nose_cover": float((nose & cut).sum() / max(nose.sum(), 1)),
              "mouth_cover": float((mouth & cut).sum() / max(mouth.sum(), 1)),
              "solidity": area / hull_area if hull_area else 0.0,
              "area_ratio": area / max(float(outline.sum()), 1.0)}
    if skin.sum() >= 8 and area:
        skin_lab = lab[skin > 0]
        mu = np.median(skin_lab, 0)
        inside = lab[cut > 0]
        scores["skin_distance"] = float(np.linalg.norm(np.median(inside, 0) - mu))
        scores["skin_inside"] = float((np.linalg.norm(inside - mu, axis=1) < SKIN_NEAR).mean())
    else:
        scores["skin_distance"], scores["skin_inside"] = 0.0, 1.0
    checks = [("nose_cover", scores["nose_cover"] >= MIN_NOSE_COVER, f"nose not covered ({scores['nose_cover']:.2f} < {MIN_NOSE_COVER})"),
              ("mouth_cover", scores["mouth_cover"] >= MIN_MOUTH_COVER, f"mouth not covered ({scores['mouth_cover']:.2f} < {MIN_MOUTH_COVER})"),
              ("solidity", scores["solidity"] >= MIN_SOLIDITY, f"ragged cut (solidity {scores['solidity']:.2f} < {MIN_SOLIDITY})"),
              ("area_ratio", AREA_RANGE[0] <= scores["area_ratio"] <= AREA_RANGE[1],
               f"cut too {'small' if scores['area_ratio'] < AREA_RANGE[0] else 'large'} "
               f"({scores['area_ratio']:.2f}x the lower face, outside {AREA_RANGE[0]}..{AREA_RANGE[1]})"),
              ("skin_distance", scores["skin_distance"] >= MIN_SKIN_DISTANCE,
               f"cut looks like the skin (Lab distance {scores['skin_distance']:.1f} < {MIN_SKIN_DISTANCE})"),
              ("skin_inside", scores["skin_inside"] <= MAX_SKIN_INSIDE,
               f"skin inside the cut ({scores['skin_inside']:.2f} > {MAX_SKIN_INSIDE}: a hand, or the mask pulled down)")]
    failed = next((msg for _, ok, msg in checks if not ok), "")
    return failed, {k: round(v, 4) for k, v in scores.items()}


def to_frame(rgb: np.ndarray, L: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A photo and an alpha (0-255, photo size) warped from the photo's mask anchors (its 68
    landmarks ``L``) to the templates' frame, piecewise over the overlay's triangles:
    SIZE[1] x SIZE[0] x 4 float32, pose and face size gone."""
    w, h = SIZE
    rgba = np.dstack([rgb.astype(np.float32), alpha.astype(np.float32)])
    return warp_template(rgba, anchor_points(L), canonical_anchors(), triangles(), (0, 0, w, h))


def cut_to_template(rgb: np.ndarray, L: np.ndarray, cut: np.ndarray, *, source: str, index: int,
                feather_px: float = 1.5) -> Template:
    """The cut (photo pixels + feathered alpha) warped from the photo's anchors to the canonical
    anchors: a Template in the procedural templates' frame."""
    alpha = cv2.GaussianBlur(cut.astype(np.float32) * 255.0, (0, 0), feather_px) * cut.astype(np.float32)
    anchors = canonical_anchors()
    warped = to_frame(rgb, L, alpha)
    a = warped[..., 3] / 255.0
    if (a > 0.5).any():  # the photo's light out (the overlay's sigma, in template pixels)
        light = smooth_light(warped[..., :3] @ LUMA, a, max(2.0, 0.12 * float(np.ptp(anchors[:18, 0]))))
        ref = float(np.median(light[a > 0.5]))
        warped[..., :3] *= np.clip(ref / np.maximum(light, 1.0), 0.6, 1.7)[..., None]
    return Template(rgba=np.clip(warped + 0.5, 0, 255).astype(np.uint8), anchors=anchors.copy(),
                    mask_type=BANK_MASK_TYPE, colour="photo", texture=source, variant=index)


def symmetry(template: Template) -> float:
    """IoU of a template's alpha with its mirror image about the canonical face's midline: the
    pose is warped out, so a whole mask is close to symmetric and a half-hidden one is not."""
    a = template.rgba[..., 3] > 127
    mid = float(to_template(CANONICAL_112[27:31].mean(0, keepdims=True))[0, 0])  # the nose's line
    cols = np.arange(a.shape[1])
    mirror = np.clip(np.round(2 * mid - cols).astype(int), 0, a.shape[1] - 1)
    b = a[:, mirror] & ((2 * mid - cols >= 0) & (2 * mid - cols < a.shape[1]))[None, :]
    union = float((a | b).sum())
    return round(float((a & b).sum()) / union, 4) if union else 0.0


def subject_face(faces: list, shape: tuple[int, int]) -> tuple[int | None, str]:
    """Index of the one clear subject among RetinaFace's faces, or None and why not."""
    if not faces:
        return None, "no face found (RetinaFace)"
    boxes = [f.xyxy for f in faces]
    i = subject_index(boxes, shape[1], shape[0])
    area = [max(b[2] - b[0], 0) * max(b[3] - b[1], 0) for b in boxes]
    others = [a for k, a in enumerate(area) if k != i]
    if others and max(others) >= MAX_OTHER_FACE * area[i]:
        return None, f"no clear subject: {len(faces)} faces of similar size"
    eyes = faces[i].points[:2]
    if float(np.hypot(*(eyes[0] - eyes[1]))) < MIN_EYE_DISTANCE:
        return None, f"face too small (eyes {np.hypot(*(eyes[0] - eyes[1])):.0f} px apart < {MIN_EYE_DISTANCE:.0f})"
    return i, ""


class BankBuilder:
    """RetinaFace + dlib's 68-point predictor, loaded once (one per worker process)."""

    def __init__(self, predictor_path=None):
        """``predictor_path``: a verified .dat (:func:`~pipeline.mask.landmarks.check_predictor`);
        None: dlib's own, checked here."""
        import dlib

        from pipeline.mask.landmarks import check_predictor

        self.predictor = dlib.shape_predictor(str(predictor_path or check_predictor(None)))

    def landmarks(self, rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
        import dlib

        from pipeline.align.geometry import dlib_box_from_points

        s = self.predictor(np.ascontiguousarray(rgb), dlib.rectangle(*dlib_box_from_points(points)))
        return np.array([[p.x, p.y] for p in s.parts()], dtype=np.float64)

    def entry(self, rgb: np.ndarray, *, source: str, index: int) -> BankEntry:
        from pipeline.align import retinaface

        faces = retinaface.detect(rgb)
        i, why = subject_face(faces, rgb.shape[:2])
        if i is None:
            return BankEntry(source, False, why)
        L = self.landmarks(rgb, faces[i].points)
        cut = segment_mask(rgb, L)
        why, scores = quality(rgb, L, cut)
        drawn = rgb.copy()
        contours, _ = cv2.findContours(cut, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        template = cut_to_template(rgb, L, cut, source=source, index=index)
        scores["symmetry"] = symmetry(template)
        if not why and scores["symmetry"] < MIN_SYMMETRY:
            why = f"one-sided cut (symmetry {scores['symmetry']:.2f} < {MIN_SYMMETRY}: part of the mask hidden)"
        cv2.drawContours(drawn, contours, -1, (0, 255, 0) if not why else (255, 0, 0), 1)
        return BankEntry(source, not why, why, scores, None if why else template, L, cut, drawn)
