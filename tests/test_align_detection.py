"""Alignment geometry and detectors on real images (LFW, real masked photos from RMFD)."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from pipeline.align import detection as al
from pipeline.align import geometry as geo
from pipeline.config import StandaloneParams
from tests.conftest import PROJECT_ROOT, lfw_root

RMFD = PROJECT_ROOT.parent / "shared" / "data" / "rmfd" / "RWMFD_part_1"


def _read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def lfw_images(tmp_path_factory):
    """Six real LFW photos copied into a temporary folder."""
    dest = tmp_path_factory.mktemp("lfw_align")
    names = ["Aaron_Peirsol/Aaron_Peirsol_0001", "Abdullah_Gul/Abdullah_Gul_0005",
             "Adel_Al-Jubeir/Adel_Al-Jubeir_0001", "Colin_Powell/Colin_Powell_0001",
             "George_W_Bush/George_W_Bush_0010", "Serena_Williams/Serena_Williams_0001"]
    out = []
    for n in names:
        src = lfw_root() / "lfw-deepfunneled" / f"{n}.jpg"
        shutil.copy(src, dest / src.name)
        out.append(_read_rgb(dest / src.name))
    return out


def test_similarity_puts_eyes_on_template_and_levels_them():
    left, right = (100.0, 120.0), (150.0, 100.0)  # tilted eye line
    m = geo.similarity_from_eyes(left, right)
    mapped = geo.apply_matrix(m, np.array([left, right]))
    assert np.allclose(mapped, geo.TEMPLATE_EYES, atol=1e-9)
    # a similarity: equal scale on both axes, no shear
    a, b = m[0, 0], m[1, 0]
    assert np.allclose(m[:, :2], [[a, -b], [b, a]])
    with pytest.raises(geo.AlignmentError):
        geo.similarity_from_eyes(left, left)


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    theta, s, t = 0.3, 0.7, np.array([5.0, -12.0])
    rot = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = src @ rot.T + t
    m = geo.umeyama_similarity(src, dst)
    assert np.allclose(m[:, :2], rot, atol=1e-9) and np.allclose(m[:, 2], t, atol=1e-9)


def test_eye_pose_calibration_corrects_the_known_biases():
    face = (50.0, 50.0, 100.0, 100.0)
    typical = ((82.0, 90.0), (118.0, 90.0))  # level, centred, usual eye distance for the box
    (lx, ly), (rx, ry) = al.calibrate_eyes(face, typical)
    assert max(abs(lx - 82), abs(ly - 90), abs(rx - 118), abs(ry - 90)) < 2.0  # under 2% of the box
    turned = ((92.0, 90.0), (128.0, 90.0))  # the pair sits right of the box centre: a turned head
    (tlx, _), (trx, _) = al.calibrate_eyes(face, turned)
    assert tlx < 92 - 1 and trx < 128 - 1  # both eyes pulled back against the turn
    wide = ((70.0, 90.0), (130.0, 90.0))
    (wlx, _), (wrx, _) = al.calibrate_eyes(face, wide)
    assert wrx - wlx < 60 - 3  # an implausibly wide pair is narrowed
    tilted = ((82.0, 85.0), (118.0, 95.0))
    (_, a), (_, b) = al.calibrate_eyes(face, tilted)
    assert 0 < b - a < 10  # rolled back a little, not flipped


def test_cascade_finds_face_and_eyes_on_real_lfw(lfw_images):
    found = [al.cascade_detect(im) for im in lfw_images]
    assert all(r.face is not None for r in found)
    with_eyes = [r for r in found if r.eyes is not None]
    assert len(with_eyes) >= 5
    for r in with_eyes:
        (lx, ly), (rx, ry) = r.eyes
        x, y, w, h = r.face
        assert lx < rx and x <= lx <= x + w and x <= rx <= x + w
        assert y <= min(ly, ry) and max(ly, ry) <= y + 0.7 * h  # eyes in the upper face


def test_pair_transform_routes_and_landmarks_method(lfw_images):
    im = lfw_images[0]
    res = al.estimate_pair_transform(im)
    assert res.route in al.ROUTES_CASCADE and res.matrix.shape == (2, 3)
    # no face at all (a flat grey image): the landmarks are the fallback, else a reasoned rejection
    flat = np.full((250, 250, 3), 128, np.uint8)
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48] = (90.0, 110.0), (160.0, 110.0)
    lm[30], lm[48], lm[54] = (125.0, 150.0), (100.0, 180.0), (150.0, 180.0)
    fb = al.estimate_pair_transform(flat, lm)
    assert fb.route == "landmarks_eyes"
    assert np.allclose(geo.apply_matrix(fb.matrix, [[90, 110], [160, 110]]), geo.TEMPLATE_EYES)
    none = al.estimate_pair_transform(flat)
    assert none.matrix is None and none.route == "none" and "no cascade face" in none.reason
    five = al.estimate_pair_transform(flat, lm, method="landmarks")
    assert five.route == "landmarks5"
    # the 5-point fit lands every point near its template position
    assert np.abs(geo.apply_matrix(five.matrix, geo.five_points_from_landmarks(lm)) - geo.TEMPLATE_5).max() < 8
    with pytest.raises(geo.AlignmentError):
        al.estimate_pair_transform(im, method="sift")


def test_standalone_aligns_real_masked_photos():
    """Real masked photos (RMFD): RetinaFace, the first route, aligns the portraits the old chain
    (Haar eyes, dlib HOG) mostly missed; each crop has the template's size; failures say why."""
    paths = sorted(RMFD.glob("000[0-2]/*.jpg"))[:8]
    assert len(paths) >= 6, f"RMFD sample not found under {RMFD}"
    results = [al.align_standalone(_read_rgb(p), template=geo.DLIB_150) for p in paths]
    ok = [r for r in results if r.crop is not None]
    assert len(ok) >= len(results) - 1
    for r in ok:
        assert r.crop.shape == (150, 150, 3) and r.crop.dtype == np.uint8
        assert r.route == "retinaface5" and r.reason == "" and r.matrix.shape == (2, 3)
    old = StandaloneParams(routes=["haar", "dlib_hog"])
    assert sum(al.align_standalone(_read_rgb(p), params=old).crop is not None for p in paths) < len(ok)


def test_standalone_routes_in_order_and_what_places_the_crop(lfw_images):
    """Each route alone aligns an unmasked LFW portrait; the crops agree with the training
    geometry (dlib's five points -> template) to a few pixels, whichever points place them."""
    from pipeline.mask.landmarks import LandmarkDetector, default_predictor_path

    det = LandmarkDetector(default_predictor_path())
    for k, image in enumerate(lfw_images[:3]):
        lm = det.detect(image).landmarks
        train = geo.umeyama_similarity(geo.five_points_from_landmarks(lm), geo.TEMPLATE_5)
        eyes = np.stack(geo.eye_centres_from_landmarks(lm))
        for routes, points, expect in ((["retinaface"], "five", "retinaface5"),
                                       (["retinaface"], "eyes", "retinaface_eyes"),
                                       (["retinaface"], "dlib68", "retinaface_dlib68"),
                                       (["haar", "retinaface"], "five", "haar_eyes"),
                                       (["dlib_hog"], "five", "dlib_hog")):
            res = al.align_standalone(image, params=StandaloneParams(routes=routes, retinaface_points=points))
            assert res.route == expect, (k, routes)
            shift = np.linalg.norm(geo.apply_matrix(res.matrix, eyes) - geo.apply_matrix(train, eyes), axis=1)
            # dlib's own points (HOG or RetinaFace's box): the training crop; other points: near it
            assert shift.max() < (1.0 if expect in ("dlib_hog", "retinaface_dlib68") else 6.0), (k, expect, shift)


def test_standalone_rejects_bad_input_and_reports_no_face():
    with pytest.raises(geo.AlignmentError):
        al.align_standalone(np.zeros((10, 10), np.float32))
    res = al.align_standalone(np.full((120, 120, 3), 200, np.uint8))
    assert res.crop is None and res.route == "none" and res.reason


def test_subject_rule_and_box_conventions():
    """One rule picks the subject: the box centre nearest the photo's centre, the larger box on a
    tie; boxes of every detector meet it as (x0, y0, x1, y1)."""
    w, h = 250, 250
    centred_small = (95, 95, 155, 155)
    big_off_centre = (130, 20, 250, 160)
    assert geo.subject_order([big_off_centre, centred_small], w, h) == [1, 0]
    # two boxes with the same centre: the larger first, whatever the order given
    inner, outer = (100, 100, 150, 150), (80, 80, 170, 170)
    assert geo.subject_index([inner, outer], w, h) == 1 and geo.subject_index([outer, inner], w, h) == 0
    with pytest.raises(ValueError, match="no face boxes"):
        geo.subject_index([], w, h)
    assert geo.box_from_xywh((10, 20, 30, 40)) == (10.0, 20.0, 40.0, 60.0)
    x0, y0, x1, y1 = geo.dlib_box_from_haar((100, 100, 100, 100))
    a, b, c, d = geo.HAAR_TO_DLIB_BOX
    assert (x0, y0, x1, y1) == (100 + 100 * a, 100 + 100 * b, 100 + 100 * c, 100 + 100 * d)


def test_every_route_picks_the_same_subject_in_a_two_face_photo():
    """Julianne Moore 0008: she is in the middle, a man's larger face above and right of her (the
    area-weighted rules the mask stage and alignment had picked him). The mask stage's landmarks,
    the Haar face order and each standalone route now all take her: each standalone crop puts her
    eyes (the mask stage's 68 points) on the template's eyes."""
    from pipeline.align import retinaface
    from pipeline.mask.landmarks import LandmarkDetector, default_predictor_path

    image = _read_rgb(lfw_root() / "lfw-deepfunneled" / "Julianne_Moore" / "Julianne_Moore_0008.jpg")
    res = LandmarkDetector(default_predictor_path(), retinaface_first=False).detect(image)
    assert res.route == "hog" and res.n_faces == 2
    x0, y0, x1, y1 = res.face_box
    assert abs((x0 + x1) / 2 - 125) < 15 and abs((y0 + y1) / 2 - 125) < 20
    assert max(f.box[2] * f.box[3] for f in retinaface.detect(image)) > 1.2 * (x1 - x0) * (y1 - y0)  # a bigger face
    eyes = np.stack(geo.eye_centres_from_landmarks(res.landmarks))
    hx, hy, hw, hh = al.detect_faces(al.cascade_gray(image))[0]
    assert all(hx < ex < hx + hw and hy < ey < hy + hh for ex, ey in eyes)
    for route in ("retinaface", "haar", "dlib_hog"):
        out = al.align_standalone(image, params=StandaloneParams(routes=[route]))
        assert out.matrix is not None, route
        err = np.linalg.norm(geo.apply_matrix(out.matrix, eyes) - geo.TEMPLATE_EYES, axis=1).max()
        assert err < 6.0, (route, err)


def test_mask_fallback_and_standalone_run_retinaface_alike():
    """Abdoulaye Wade 0003, a face HOG misses: the mask stage's RetinaFace route and standalone
    alignment's ``retinaface_dlib68`` route both put dlib's predictor in the box of the same
    RetinaFace detection (one configuration, one subject rule), so their five points agree to
    rounding."""
    from pipeline.mask.landmarks import LandmarkDetector, default_predictor_path

    image = _read_rgb(lfw_root() / "lfw-deepfunneled" / "Abdoulaye_Wade" / "Abdoulaye_Wade_0003.jpg")
    res = LandmarkDetector(default_predictor_path(), retinaface_first=False).detect(image)
    assert res.route == "retinaface"
    out = al.align_standalone(image, params=StandaloneParams(routes=["retinaface"], retinaface_points="dlib68"))
    assert out.route == "retinaface_dlib68"
    mask_five = geo.five_points_from_landmarks(res.landmarks)
    assert np.allclose(out.matrix, geo.umeyama_similarity(mask_five, geo.TEMPLATE_5), atol=1e-9)
