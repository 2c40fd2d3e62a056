"""pipeline/mask/realism.py on real LFW faces wearing the project's masks: the crops show the mask
region only, and the classifier finds a planted fake (flat paint: no grain, fold or light) while
two halves of one kind of mask stay at chance."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import MaskParams
from pipeline.data.images import decode_rgb
from pipeline.mask.landmarks import default_predictor_path
from pipeline.mask.realism import CROP, EYE_CROP, GREY, eye_crop, mask_crop, paired_difference, separability
from pipeline.mask.stage import get_detector, mask_image
from tests.conftest import lfw_root


@pytest.fixture(scope="module")
def worn():
    """40 LFW faces (first photo of every 20th person) in procedural masks: (photo, masked, landmarks, mask)."""
    detector = get_detector(str(default_predictor_path()), MaskParams())
    people = sorted((lfw_root() / "lfw-deepfunneled").iterdir())[::20]
    out = []
    for person in people:
        photo = sorted(person.iterdir())[0]
        rgb = decode_rgb(photo.read_bytes())
        m = mask_image(rgb, photo.stem, detector, MaskParams())
        if "masked" in m:
            out.append((rgb, m["masked"], m["landmarks"], m["mask"]))
        if len(out) == 40:
            break
    assert len(out) == 40
    return out


def test_the_crop_shows_the_mask_region_and_its_edge_only(worn):
    rgb, masked, L, mask = worn[0]
    crop = mask_crop(masked, L, mask)
    assert crop.shape == (CROP[1], CROP[0], 4) and crop.dtype == np.float32 and 0 <= crop.min() <= crop.max() <= 1
    grey = np.all(np.abs(crop[..., :3] - GREY / 255) < 1e-6, axis=2)
    assert 0.2 < (crop[..., 3] > 0.5).mean() < 0.9 and not grey[crop[..., 3] > 0.5].any()
    assert 0.2 < grey.mean() < 0.8  # the frame's corners (eyes, background) are blanked, the mask is not
    # what is shown does not depend on the face away from the region: another photo's pixels there
    # (beyond the band, BAND frame pixels ~ 2 photo pixels here) change nothing
    near = cv2.dilate((mask > 0).astype(np.uint8), np.ones((17, 17), np.uint8))
    swapped = np.where(near[..., None] > 0, masked, worn[1][1])
    assert np.allclose(mask_crop(swapped, L, mask), crop)
    assert not np.allclose(mask_crop(np.where(near[..., None] > 0, worn[1][1], masked), L, mask), crop)
    eyes = eye_crop(rgb, L)
    assert eyes.shape == (EYE_CROP[1], EYE_CROP[0], 3)


def test_a_planted_fake_is_found_and_two_halves_of_one_kind_are_not(worn):
    crops = np.array([mask_crop(m, L, k) for _, m, L, k in worn])
    flat = []
    for _, m, L, k in worn:  # the planted defect: each mask painted one flat colour (no fold, no light)
        painted = m.copy()
        painted[k > 0] = m[k > 0].reshape(-1, 3).mean(0).astype(np.uint8)
        flat.append(mask_crop(painted, L, k))
    found = separability(crops[:20], np.array(flat)[20:], replicates=200)
    assert found.accuracy >= 0.85 and found.auc >= 0.9, found.as_dict()
    same = separability(crops[:20], crops[20:], replicates=200)
    assert same.accuracy_ci[0] <= 0.5 + 0.1 and same.accuracy <= 0.75, same.as_dict()
    again = separability(crops[:20], crops[20:], replicates=200)
    assert np.array_equal(again.scores, same.scores)  # deterministic on one machine
    assert paired_difference(same, same) == {"diff": 0.0, "ci": [0.0, 0.0]}
    d = paired_difference(found, same)
    assert d["diff"] > 0 and d["ci"][0] > 0
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        separability(crops[:3], crops[3:6])
