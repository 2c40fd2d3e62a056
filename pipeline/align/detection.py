"""Face alignment to a crop template (:mod:`pipeline.align.geometry`: ArcFace 112 or dlib's 150
chip): Viola-Jones cascades or the mask stage's dlib landmarks, each with the other as fallback.

Why cascades: they are fast, need no model download, and find the eyes, which a face mask leaves
uncovered. The transform is a similarity (rotation + uniform scale + shift) that puts the two eye
centres on the template eye positions, so the eye line ends up level. In pair mode the transform
estimated on the raw image is applied unchanged to its masked twin, so the pair stays pixel-aligned.

Routes (each aligned image records one):
- ``cascade_eyes``  Haar face + a plausible Haar eye pair in the upper face box.
- ``cascade_box``   Haar face, no plausible eye pair: eyes predicted from the face box.
- ``landmarks_eyes`` no Haar face: eye centres from dlib's 68 landmarks (mask stage output).
- ``landmarks5``    ``align.method: landmarks``: least-squares 5-point similarity from the
                    landmarks (no landmarks: the cascade routes above).
- ``pre_aligned``   the data set's ``assume_aligned``: a 112x112 crop already on the ArcFace template
                    (insightface's sets), passed through unchanged (Haar on it only degrades it), or
                    mapped onto another template by the template-to-template similarity.
Standalone mode (:func:`align_standalone`, photos without a twin, masked or not) tries the routes
of ``standalone.routes`` in order: RetinaFace (:mod:`pipeline.align.retinaface`, the mask-robust
detector), Haar face + eyes, dlib HOG, dlib CNN.

Images are RGB numpy arrays everywhere here; conversion to grey happens inside.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from pipeline.data.image_check import check_image
from pipeline.data.ingest import IMAGE_EXTENSIONS
from pipeline.dlib_models import CNN_DETECTOR, SHAPE_68, dlib_models_dir
from pipeline.align.geometry import (ARCFACE_112, CROP_SIZE, AlignmentError, Template, box_from_rect,
                                     box_from_xywh, crop_to_crop_matrix, dlib_box_from_points,
                                     eye_centres_from_landmarks, five_points_from_landmarks, similarity_from_eyes,
                                     subject_index, subject_order, umeyama_similarity, warp)

if TYPE_CHECKING:
    from pipeline.config import StandaloneParams


# Eye cascades and where the eye centre lies inside each one's box (share of width / height):
# boxes include the eyebrow, so the centre is below the middle. Calibrated on 400 LFW train
# images against the mean of dlib's eye-contour landmarks (median offset per cascade).
EYE_CASCADES = (("haarcascade_eye.xml", (0.525, 0.535)),
                ("haarcascade_eye_tree_eyeglasses.xml", (0.50, 0.52)),
                ("haarcascade_lefteye_2splits.xml", (0.445, 0.675)),
                ("haarcascade_righteye_2splits.xml", (0.48, 0.675)))
# Eye search passes: (face width the upper face box is resized to, cascade pyramid step). The
# fast pass finds a pair on ~92% of LFW; the finer one is the retry.
EYE_PASSES = ((180, 1.15), (220, 1.08))
# Face passes: (cascade, minNeighbors, pyramid step, smallest face as a share of the short side).
FACE_PASSES = (("haarcascade_frontalface_default.xml", 5, 1.2, 0.2),
               ("haarcascade_frontalface_alt2.xml", 3, 1.2, 0.2),
               ("haarcascade_frontalface_default.xml", 3, 1.05, 0.1),
               ("haarcascade_frontalface_alt2.xml", 2, 1.05, 0.1))
# Eye centres predicted from a Haar frontal-face box (share of box side), for the box-only route.
# Calibrated on LFW train (median of dlib eye centres relative to the Haar box).
BOX_EYES = ((0.32, 0.40), (0.675, 0.40))

# Haar eye pairs err in ways their face box predicts: on a turned head both eyes sit too far
# towards the turn, a pair too wide or narrow for its box is off in eye distance, a rolled pair
# is rolled too far. Correction (in face-box widths) = eye_pose_features @ this matrix; rows:
# 1, eye-midpoint x offset from the box centre / w, its y offset / h, eye distance / w, eye-line
# slope; columns: image-left eye x, y, image-right eye x, y. Least squares against dlib's eye
# centres on the LFW View 1 train people (scripts/calibrate_eyes.py); on the test people it
# raises the eye pairs within 4 px from 91.4% to 93.4%.
EYE_POSE_CORRECTION = np.array([[-0.0433, 0.0012, 0.0463, -0.0027],
                                [-0.2051, -0.0047, -0.2067, 0.0004],
                                [0.0624, -0.0543, -0.0586, -0.0589],
                                [0.1463, -0.0121, -0.1504, -0.0083],
                                [-0.0067, 0.0498, 0.0047, -0.0557]])

ROUTES_CASCADE = ("cascade_eyes", "cascade_box")
ROUTES = ROUTES_CASCADE + ("landmarks_eyes", "landmarks5", "pre_aligned")




# ----------------------------------------------------------------------------------------------
# Detectors: loaded lazily once per process (workers are separate processes)
# ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}


def _cascade(name: str) -> cv2.CascadeClassifier:
    with _LOCK:
        if name not in _CACHE:
            path = os.path.join(cv2.data.haarcascades, name)
            clf = cv2.CascadeClassifier(path)
            if clf.empty():
                raise RuntimeError(f"OpenCV cascade {path} could not be loaded")
            _CACHE[name] = clf
        return _CACHE[name]  # type: ignore[return-value]


def _dlib(kind: str):
    import dlib

    with _LOCK:
        if kind not in _CACHE:
            if kind == "hog":
                _CACHE[kind] = dlib.get_frontal_face_detector()
            elif kind == "shape68":
                _CACHE[kind] = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_68))
            elif kind == "cnn":
                _CACHE[kind] = dlib.cnn_face_detection_model_v1(str(dlib_models_dir() / CNN_DETECTOR))
            else:
                raise KeyError(kind)
        return _CACHE[kind]


# ----------------------------------------------------------------------------------------------
# Cascade detection
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CascadeResult:
    face: Optional[tuple[int, int, int, int]]  # x, y, w, h in image pixels
    eyes: Optional[tuple[tuple[float, float], tuple[float, float]]]  # image-left, image-right


def cascade_gray(image_rgb: np.ndarray) -> np.ndarray:
    """The grey image the cascades search: RGB (or grey) converted and histogram-equalised."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise AlignmentError("expected a uint8 numpy image")
    if image_rgb.ndim == 2:
        gray = image_rgb
    elif image_rgb.ndim == 3 and image_rgb.shape[2] == 3:
        gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    else:
        raise AlignmentError(f"expected an HxW or HxWx3 image, got shape {image_rgb.shape}")
    return cv2.equalizeHist(gray)


def detect_faces(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Frontal-face boxes (x, y, w, h), the subject first (:func:`~pipeline.align.geometry.subject_order`),
    in ``gray`` (:func:`cascade_gray`): the one Haar face configuration (:data:`FACE_PASSES`:
    the alt2 cascade, then a finer and smaller search, as retries when a pass finds nothing; the
    retries cost time only on the few images that need them), used by the cascade alignment
    routes and by the mask stage's Haar fallback."""
    side = min(gray.shape[:2])
    for name, neighbours, step, min_share in FACE_PASSES:
        min_size = max(24, int(side * min_share))
        found = _cascade(name).detectMultiScale(gray, scaleFactor=step, minNeighbors=neighbours,
                                                minSize=(min_size, min_size))
        if len(found):
            boxes = [tuple(int(v) for v in b) for b in found]
            return [boxes[i] for i in subject_order([box_from_xywh(b) for b in boxes], gray.shape[1], gray.shape[0])]
    return []


def _eye_pair_score(a, b, w: int, h: int) -> Optional[float]:
    """Lower is better; None when the pair is implausible for a frontal face of size w x h."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    dx, dy = bx - ax, by - ay
    if not 0.25 * w <= dx <= 0.65 * w or abs(dy) > 0.35 * dx:
        return None
    if max(asz, bsz) > 1.8 * min(asz, bsz):
        return None
    mid_x, mid_y = (ax + bx) / 2 / w, (ay + by) / 2 / h
    if abs(mid_x - 0.5) > 0.15:
        return None
    expect = np.array([0.5, BOX_EYES[0][1], BOX_EYES[1][0] - BOX_EYES[0][0]])
    got = np.array([mid_x, mid_y, dx / w])
    return float(np.abs(got - expect).sum() + abs(dy) / dx * 0.5)


def detect_eyes(gray: np.ndarray, face: Sequence[int]):
    """Eye centres in the upper face box, or None when no plausible pair is found.

    The upper face box is resized to a fixed face width (the eye cascades' 20 px windows then fit
    the eyes), and four eye cascades (eye, eyeglasses, left/right 2-splits) all vote: the most
    plausible pair is picked from their union, then each eye centre is the mean of all
    candidates near it, which halves the jitter of a single Haar box. A finer, larger search is
    the retry when the fast one finds no plausible pair.
    """
    for face_px, step in EYE_PASSES:
        eyes = _eyes_once(gray, face, face_px, step)
        if eyes is not None:
            return eyes
    return None


def _eyes_once(gray: np.ndarray, face: Sequence[int], face_px: int, step: float):
    x, y, w, h = face
    y0, y1 = max(0, y + int(0.12 * h)), max(0, y + int(0.62 * h))
    x0 = max(0, x)
    roi = gray[y0:y1, x0:x + w]
    if roi.size == 0 or min(roi.shape) < 8:
        return None
    up = float(np.clip(face_px / w, 0.5, 4.0))
    roi = cv2.resize(roi, None, fx=up, fy=up, interpolation=cv2.INTER_LINEAR)
    min_eye, max_eye = max(8, int(w * up * 0.1)), max(9, int(w * up * 0.42))
    cands = []
    for name, (ox, oy) in EYE_CASCADES:
        found = _cascade(name).detectMultiScale(roi, scaleFactor=step, minNeighbors=1,
                                                minSize=(min_eye, min_eye), maxSize=(max_eye, max_eye))
        # candidate = (x, y) of the eye centre relative to the face box, and the box width
        cands += [((ex + ox * ew) / up + x0 - x, (ey + oy * eh) / up + y0 - y, ew / up)
                  for ex, ey, ew, eh in found]
    cands.sort()

    def near(e):
        return [c for c in cands if abs(c[0] - e[0]) < 0.3 * e[2] and abs(c[1] - e[1]) < 0.3 * e[2]]

    # An eye many cascades agree on is more likely an eye (and not a brow or nostril).
    support = [np.log(len(near(c))) for c in cands]
    best = None
    for i, a in enumerate(cands):
        for j in range(i + 1, len(cands)):
            s = _eye_pair_score(a, cands[j], w, h)
            if s is not None:
                s -= 0.05 * min(support[i], support[j])
                if best is None or s < best[0]:
                    best = (s, a, cands[j])
    if best is None:
        return None
    eyes = []
    for e in best[1:]:
        votes = near(e)
        eyes.append((x + float(np.mean([c[0] for c in votes])), y + float(np.mean([c[1] for c in votes]))))
    return eyes[0], eyes[1]


def eye_pose_features(face: Sequence[float], eyes) -> np.ndarray:
    """What predicts a Haar eye pair's error: where the pair sits in its face box, how far apart
    and how sloped it is (the rows of :data:`EYE_POSE_CORRECTION`)."""
    x, y, w, h = (float(v) for v in face)
    (lx, ly), (rx, ry) = eyes
    return np.array([1.0, ((lx + rx) / 2 - (x + w / 2)) / w, ((ly + ry) / 2 - (y + h / 2)) / h,
                     (rx - lx) / w, (ry - ly) / (rx - lx)])


def calibrate_eyes(face: Sequence[float], eyes):
    """The eye pair corrected for the pose bias of Haar eye boxes (:data:`EYE_POSE_CORRECTION`)."""
    shift = eye_pose_features(face, eyes) @ EYE_POSE_CORRECTION * float(face[2])
    (lx, ly), (rx, ry) = eyes
    return ((lx + shift[0], ly + shift[1]), (rx + shift[2], ry + shift[3]))


def cascade_detect(image_rgb: np.ndarray, calibrate: bool = True) -> CascadeResult:
    """The most plausible face box and, when found, its most plausible eye pair (image pixels),
    pose-calibrated unless ``calibrate`` is False (scripts/calibrate_eyes.py fits on raw pairs).

    Tries each detected face in plausibility order and keeps the first with an eye pair; without
    any eye pair the most plausible face is returned alone.
    """
    gray = cascade_gray(image_rgb)
    faces = detect_faces(gray)
    if not faces:
        return CascadeResult(None, None)
    for face in faces[:3]:
        eyes = detect_eyes(gray, face)
        if eyes is not None:
            return CascadeResult(face, calibrate_eyes(face, eyes) if calibrate else eyes)
    return CascadeResult(faces[0], None)


def box_eyes(face: Sequence[int]) -> tuple[tuple[float, float], tuple[float, float]]:
    x, y, w, h = face
    return ((x + BOX_EYES[0][0] * w, y + BOX_EYES[0][1] * h),
            (x + BOX_EYES[1][0] * w, y + BOX_EYES[1][1] * h))


# ----------------------------------------------------------------------------------------------
# Pair mode (used by the align stage)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairAlignment:
    """A raw->crop transform for one image; ``matrix`` None means rejected (``reason`` says why)."""

    matrix: Optional[np.ndarray]
    route: str
    eyes: Optional[list[list[float]]]  # eye centres found, raw-image pixels (None: box route)
    reason: str = ""


def pre_aligned(image_rgb: np.ndarray, template: Template = ARCFACE_112) -> PairAlignment:
    """An ArcFace-aligned 112x112 crop: the identity transform (or the similarity onto another
    ``template``); any other size is rejected, not resized."""
    h, w = image_rgb.shape[:2]
    if (h, w) != (CROP_SIZE, CROP_SIZE):
        return PairAlignment(None, "none", None,
                             f"assume_aligned, but the image is {w}x{h}, not {CROP_SIZE}x{CROP_SIZE}")
    return PairAlignment(crop_to_crop_matrix(ARCFACE_112, template), "pre_aligned", None)


def _eyes(left, right) -> list[list[float]]:
    return [list(map(float, left)), list(map(float, right))]


def estimate_pair_transform(image_rgb: np.ndarray, landmarks: Optional[np.ndarray] = None,
                            method: str = "cascade", template: Template = ARCFACE_112) -> PairAlignment:
    """The raw image's transform into ``template``'s crop. ``method='landmarks'``: the 5-point
    similarity from ``landmarks`` (68x2, from the mask stage), the cascade routes when there are
    none; ``method='cascade'``: the cascade routes, the landmark eyes when no cascade face is found."""
    if method not in ("cascade", "landmarks"):
        raise AlignmentError(f"unknown alignment method {method!r}; use 'cascade' or 'landmarks'")
    if method == "landmarks" and landmarks is not None:
        m = umeyama_similarity(five_points_from_landmarks(landmarks), template.points)
        return PairAlignment(m, "landmarks5", _eyes(*eye_centres_from_landmarks(landmarks)))
    res = cascade_detect(image_rgb)
    if res.eyes is not None:
        return PairAlignment(similarity_from_eyes(*res.eyes, template.eyes), "cascade_eyes", _eyes(*res.eyes))
    if res.face is not None:
        return PairAlignment(similarity_from_eyes(*box_eyes(res.face), template.eyes), "cascade_box", None)
    if landmarks is not None:
        left, right = eye_centres_from_landmarks(landmarks)
        return PairAlignment(similarity_from_eyes(left, right, template.eyes), "landmarks_eyes", _eyes(left, right))
    return PairAlignment(None, "none", None, "no cascade face and no landmarks")


# ----------------------------------------------------------------------------------------------
# Standalone mode (evaluation / inference on a single, possibly masked, photo)
# ----------------------------------------------------------------------------------------------

# Routes of align_standalone, tried in the order given (`standalone.routes`); the recorded route
# names say which detector found the face and which points placed it.
STANDALONE_ROUTES = ("retinaface", "haar", "dlib_hog", "dlib_cnn")

@dataclass(frozen=True)
class StandaloneResult:
    crop: Optional[np.ndarray]  # S x S x 3 uint8 RGB (the template's size), None when no face could be aligned
    route: str                  # retinaface5 | retinaface_eyes | retinaface_dlib68 | haar_eyes | dlib_hog | dlib_cnn | none
    reason: str = ""
    matrix: Optional[np.ndarray] = None  # raw -> crop


def dlib_five_points(image_rgb: np.ndarray, rect) -> np.ndarray:
    """dlib's 68 points inside a face rectangle, reduced to the five template points."""
    shape = _dlib("shape68")(image_rgb, rect)
    return five_points_from_landmarks(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64))


def _retinaface(image_rgb: np.ndarray, params, template: Template):
    """(matrix, route) from the subject's RetinaFace detection, or None."""
    from pipeline.align import retinaface

    faces = retinaface.detect(image_rgb)
    if not faces:
        return None
    face = faces[subject_index([f.xyxy for f in faces], image_rgb.shape[1], image_rgb.shape[0])]
    if params.retinaface_points == "eyes":
        return similarity_from_eyes(face.points[0], face.points[1], template.eyes), "retinaface_eyes"
    if params.retinaface_points == "dlib68":
        import dlib

        points = dlib_five_points(image_rgb, dlib.rectangle(*dlib_box_from_points(face.points)))
        return umeyama_similarity(points, template.points), "retinaface_dlib68"
    return umeyama_similarity(face.points, template.points), "retinaface5"


def align_standalone(image_rgb: np.ndarray, *, params=None, template: Template = ARCFACE_112) -> StandaloneResult:
    """Align one photo with no twin, trying ``params.routes`` in order (:class:`StandaloneParams`):

    - ``retinaface``: RetinaFace's box and five points (found on ~97% of real masked photos);
      ``retinaface_points`` says which points place the crop: its own five, its two eyes, or
      dlib's 68 points inside its box reduced to five (the training crops' geometry).
    - ``haar``: Haar face + eyes (the eyes stay visible above a mask).
    - ``dlib_hog`` / ``dlib_cnn``: dlib's HOG (upsample 1) / CNN (~1 s per photo) face, then its
      68 points reduced to five.
    The subject is the face nearest the photo's centre (:func:`~pipeline.align.geometry.subject_order`);
    RetinaFace runs in its one configuration (:data:`pipeline.align.retinaface.LONG_SIDE`)."""
    from pipeline.config import StandaloneParams

    params = params or StandaloneParams()
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 \
            or image_rgb.shape[2] != 3:
        raise AlignmentError("align_standalone expects an HxWx3 uint8 RGB image")
    image_rgb = np.ascontiguousarray(image_rgb)
    for route in params.routes:
        found = None
        if route == "retinaface":
            found = _retinaface(image_rgb, params, template)
        elif route == "haar":
            res = cascade_detect(image_rgb)
            if res.eyes is not None:
                found = similarity_from_eyes(*res.eyes, template.eyes), "haar_eyes"
        else:
            rects = list(_dlib("hog")(image_rgb, 1)) if route == "dlib_hog" else \
                [d.rect for d in _dlib("cnn")(image_rgb, 1)]
            if rects:
                rect = rects[subject_index([box_from_rect(r) for r in rects], image_rgb.shape[1], image_rgb.shape[0])]
                points = dlib_five_points(image_rgb, rect)
                found = umeyama_similarity(points, template.points), route
        if found is not None:
            matrix, name = found
            return StandaloneResult(warp(image_rgb, matrix, template.size), name, "", matrix)
    return StandaloneResult(None, "none", f"no face found ({', '.join(params.routes)})")


def load_rgb(path: Path) -> tuple[np.ndarray | None, str]:
    """(RGB uint8 array, "") or (None, reason) for anything that is not a usable photo."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"unreadable: {err}"
    checked = check_image(raw)
    if checked.status != "accepted":
        return None, checked.reason
    with Image.open(io.BytesIO(checked.data)) as im:
        return np.asarray(im.convert("RGB")), ""


def align_file(path: Path, *, standalone: StandaloneParams | None = None,
               template: Template = ARCFACE_112) -> tuple[np.ndarray | None, str, str]:
    """One photo file -> (crop on ``template`` or None, route, reason): vetted as ingest vets a file
    (:func:`load_rgb`), then :func:`align_standalone`. The user commands (embed, identify,
    calibrate) and the pair benchmarks align their photos through here."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, "none", f"unsupported extension {path.suffix or '(none)'}; allowed: {sorted(IMAGE_EXTENSIONS)}"
    image, reason = load_rgb(path)
    if image is None:
        return None, "none", reason
    res = align_standalone(image, params=standalone, template=template)
    return res.crop, res.route, res.reason
