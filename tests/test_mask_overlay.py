"""Overlay quality on real LFW faces: coverage rule on 300+ images, geometry under roll and mirror,
feathered edge, light matched to the face, nothing changed outside the mask."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import MaskParams
from pipeline.mask.landmarks import LandmarkDetector, check_predictor
from pipeline.mask.overlay import overlay_mask
from pipeline.mask.templates import get_template
from pipeline.mask.stage import mask_image
from tests.conftest import lfw_root
from tests.test_mask_landmarks import lfw_rgb

FACE = "Aaron_Eckhart/Aaron_Eckhart_0001"


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector(check_predictor(None))


def coverage_failures(mask: np.ndarray, L: np.ndarray) -> list[str]:
    """The acceptance rule: nose (30-35) and mouth (48-67) covered, chin (8) covered or within 3 px,
    eyes (36-47) not covered."""
    h, w = mask.shape

    def covered(i: int) -> bool:
        x, y = np.round(L[i]).astype(int)
        return 0 <= x < w and 0 <= y < h and mask[y, x] > 0

    out = []
    if not all(covered(i) for i in [*range(30, 36), *range(48, 68)]):
        out.append("nose/mouth")
    if any(covered(i) for i in range(36, 48)):
        out.append("eyes")
    if not covered(8):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0 or np.hypot(xs - L[8, 0], ys - L[8, 1]).min() > 3:
            out.append("chin")
    return out


def test_coverage_rule_on_300_real_lfw_images(detector):
    files = sorted((lfw_root() / "lfw-deepfunneled").glob("*/*.jpg"))[::40][:320]
    assert len(files) >= 300
    params = MaskParams()
    failed, rejected = [], 0
    for f in files:
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        r = mask_image(rgb, f.stem, detector, params)
        if "mask" not in r:
            rejected += 1
            failed.append((f.stem, r["reason"]))
            continue
        assert set(np.unique(r["mask"])) <= {0, 255}
        why = coverage_failures(r["mask"], r["landmarks"])
        if why:
            failed.append((f.stem, why))
    assert len(failed) / len(files) <= 0.02, failed
    assert rejected <= 3


def test_only_the_mask_region_changes_and_edge_is_feathered(detector):
    rgb = lfw_rgb(FACE)
    L = detector.detect(rgb).landmarks
    out, mask = overlay_mask(rgb, L, get_template("surgical", "white", "plain", 0), feather_px=2.0)
    changed = np.abs(out.astype(int) - rgb.astype(int)).max(2) > 0
    ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
    assert not changed[~ring].any(), "pixels far from the mask must be untouched"
    # feathered: just outside the binary mask the photo is partly blended, not a hard cut
    outside = (cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0) & (mask == 0)
    assert changed[outside].mean() > 0.5
    hard, _ = overlay_mask(rgb, L, get_template("surgical", "white", "plain", 0), feather_px=0.0)
    assert np.abs(hard.astype(int) - out.astype(int)).max(2)[outside].mean() > 1


def test_mask_follows_head_roll(detector):
    rgb = lfw_rgb(FACE)
    L = detector.detect(rgb).landmarks
    tpl = get_template("kn95", "white", "plain", 0)
    _, mask = overlay_mask(rgb, L, tpl)
    M = cv2.getRotationMatrix2D((125, 125), 20, 1.0)
    rolled = cv2.warpAffine(rgb, M, (250, 250), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    r = detector.detect(rolled)
    assert r.route
    _, mask_rolled = overlay_mask(rolled, r.landmarks, tpl)
    expected = cv2.warpAffine(mask, M, (250, 250), flags=cv2.INTER_NEAREST) > 0
    got = mask_rolled > 0
    iou = (expected & got).sum() / (expected | got).sum()
    assert iou > 0.85, iou


def test_mask_follows_head_turn(detector):
    """A face turned to one side: the mask is wider on the side nearer the camera."""
    rgb = lfw_rgb("Adolfo_Aguilar_Zinser/Adolfo_Aguilar_Zinser_0002")
    L = detector.detect(rgb).landmarks
    _, mask = overlay_mask(rgb, L, get_template("cloth", "navy", "plain", 0))
    ys, xs = np.nonzero(mask)
    nose_x = L[30, 0]
    left, right = nose_x - xs.min(), xs.max() - nose_x
    jaw_left, jaw_right = nose_x - L[2, 0], L[14, 0] - nose_x
    # the mask's split around the nose follows the jaw's split (both sides, not a mirrored shape)
    assert np.sign(left - right) == np.sign(jaw_left - jaw_right)
    assert abs(left / right - jaw_left / jaw_right) < 0.35 * max(jaw_left / jaw_right, 1.0)
    flipped = np.ascontiguousarray(rgb[:, ::-1])
    _, mask_f = overlay_mask(flipped, detector.detect(flipped).landmarks, get_template("cloth", "navy", "plain", 0))
    a, b = mask[:, ::-1] > 0, mask_f > 0
    assert (a & b).sum() / (a | b).sum() > 0.85


def test_brightness_follows_the_face_not_the_image(detector):
    rgb = lfw_rgb(FACE)
    L = detector.detect(rgb).landmarks
    tpl = get_template("surgical", "white", "plain", 0)
    bright, mask = overlay_mask(rgb, L, tpl, shading=False)
    dark_face = (rgb.astype(np.float32) * 0.45).astype(np.uint8)
    dark, _ = overlay_mask(dark_face, L, tpl, shading=False)
    m = mask > 0
    ratio = dark[m].mean() / bright[m].mean()
    assert 0.45 < ratio < 0.85, ratio
    flat, _ = overlay_mask(dark_face, L, tpl, match_brightness=False, shading=False)
    assert flat[m].mean() > dark[m].mean() + 30
    # a bright background with the same face does not brighten the mask
    lit_bg = rgb.copy()
    lit_bg[mask == 0] = 255
    lit, _ = overlay_mask(lit_bg, L, tpl, shading=False)
    assert abs(float(lit[m].mean()) - float(bright[m].mean())) < 3


def test_grain_is_seeded(detector):
    rgb = lfw_rgb(FACE)
    L = detector.detect(rgb).landmarks
    tpl = get_template("gas", "olive", "grain", 0)
    a, _ = overlay_mask(rgb, L, tpl, rng=np.random.default_rng(1))
    b, _ = overlay_mask(rgb, L, tpl, rng=np.random.default_rng(1))
    c, _ = overlay_mask(rgb, L, tpl, rng=np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
