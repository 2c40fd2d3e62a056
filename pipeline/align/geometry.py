"""Geometry of the aligned crop: the templates, similarity transforms, warping.

Two templates (``align.template``): ``arcface112``, insightface's 112x112 five points (what
torchvision-style face nets and the pre-aligned .rec/ImageFolder sets use), and ``dlib150``, the
chip dlib's face network was trained on (``get_face_chip``, 150 px, padding 0.25): the same five
points mapped by the similarity that puts ArcFace's eyes on the chip's eyes. Feeding dlib's
network its own chip instead of a resampled 112 crop is worth +0.6 points of View 1 verification
(scripts/dlib_geometry.py).

Face boxes live here too: the conversions between detectors' box conventions and the one rule
that picks a photo's subject among its faces (:func:`subject_order`).

Kept apart from the detectors so the crop layout has one home that every consumer (align stage,
mask stage, dlib reference embedder, calibration script) imports without pulling in cascades or dlib.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

CROP_SIZE = 112
# ArcFace (insightface) 112x112 template: eye (image-left), eye (image-right), nose, mouth corners.
TEMPLATE_5 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                       [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_EYES = TEMPLATE_5[:2]
# dlib's own face chip (get_face_chip, size 150, padding 0.25) puts the eye centres here: the means
# of its 5-point template's eye corners, ((p + 0.25) / 1.5) * 150.
CHIP_SIZE = 150
CHIP_EYES = np.array([[47.7330, 47.1396], [100.2814, 47.1233]])


class AlignmentError(ValueError):
    """Input that cannot be aligned at all (wrong shape or type); no-face cases are not errors."""


def similarity_from_eyes(left: Sequence[float], right: Sequence[float],
                         template: np.ndarray = TEMPLATE_EYES) -> np.ndarray:
    """2x3 similarity mapping image-left eye -> template[0] and image-right eye -> template[1].

    Exact for two points: the rotation makes the eye line level, the scale fixes the eye distance.
    """
    p1, p2 = complex(*left), complex(*right)
    q1, q2 = complex(*template[0]), complex(*template[1])
    if abs(p2 - p1) < 1e-6:
        raise AlignmentError("the two eye centres coincide")
    a = (q2 - q1) / (p2 - p1)
    t = q1 - a * p1
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Template:
    """Where the five points (eyes, nose tip, mouth corners) go in a ``size`` x ``size`` crop."""

    name: str
    size: int
    points: np.ndarray  # 5 x 2, crop pixels

    @property
    def eyes(self) -> np.ndarray:
        return self.points[:2]

    @property
    def px_per_arcface_px(self) -> float:
        """Crop pixels per ArcFace-112 pixel (the eye-distance ratio): eye errors are reported
        in ArcFace pixels whatever the template, so one threshold fits all."""
        return float(np.linalg.norm(self.eyes[1] - self.eyes[0]) / np.linalg.norm(TEMPLATE_EYES[1] - TEMPLATE_EYES[0]))


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) src -> dst, as a 2x3 matrix; deterministic, no RANSAC."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s_c ** 2).sum() / len(src)
    if var_s < 1e-12:
        raise AlignmentError("degenerate landmark set")
    scale = np.trace(np.diag(d) @ sign) / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE,
         interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Apply a raw->crop matrix; outside the image is black (as insightface's norm_crop)."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (size, size),
                          flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def eye_centres_from_landmarks(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dlib 68-point: points 36-41 are the image-left eye, 42-47 the image-right eye."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    return lm[36:42].mean(0), lm[42:48].mean(0)


def five_points_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip (30) and mouth corners (48, 54): the ArcFace template's five points."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    left, right = eye_centres_from_landmarks(lm)
    return np.stack([left, right, lm[30], lm[48], lm[54]])


# Face boxes. Detectors give boxes in three conventions: dlib rectangles (left, top, right, bottom),
# OpenCV Haar and RetinaFace boxes (x, y, w, h). Every box that meets the subject rule or dlib's
# predictor is first turned into (x0, y0, x1, y1) here, in one place.

def box_from_xywh(box: Sequence[float]) -> tuple[float, float, float, float]:
    """(x, y, w, h) -> (x0, y0, x1, y1)."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def box_from_rect(rect) -> tuple[int, int, int, int]:
    """A dlib rectangle -> (x0, y0, x1, y1)."""
    return rect.left(), rect.top(), rect.right(), rect.bottom()


def subject_order(boxes: Sequence[Sequence[float]], width: int, height: int) -> list[int]:
    """Indices of the face boxes (x0, y0, x1, y1) of one ``width`` x ``height`` photo, the subject
    first: the box whose centre is nearest the photo's centre (ties: the larger box, then the box
    itself), as face data sets (LFW, CASIA-WebFace, VGGFace2, MS1M) crop their photos around the
    named person. The one subject rule: the mask stage (HOG, RetinaFace and Haar faces), the mask
    bank, the cascade face order and standalone alignment all pick with it.

    Measured on LFW's View 1 TRAIN people (9,525 photos, dlib HOG as the mask stage runs it;
    ``python scripts/subject_rule.py``): 361 photos hold two or more faces. On the 225 of them
    where exactly one face matches the person's own single-face photos (dlib descriptor within
    0.6 of their mean), this rule picks that face on all 225; the two rules it replaced (area x
    (1 - 0.5 min(d, 1)) in the mask stage, area share x exp(-4 r^2) in alignment; they never
    disagreed with each other) picked a larger bystander on 6, and differ from it on 9 of the
    361 in all. The subject is not the largest face on 29 of the 225 (down to 0.43 of a
    bystander's area), so size only breaks ties. On RetinaFace's boxes (``--detector
    retinaface``; 1,979 multi-face photos, most with small faces behind the subject) this rule
    and the area rules differ on 2, and all three pick the person's face on the 1,102 an
    identity check decides."""
    cx, cy = width / 2.0, height / 2.0

    def key(i: int):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        return (float(np.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy)),
                -max(x1 - x0, 0.0) * max(y1 - y0, 0.0), tuple(boxes[i]))

    return sorted(range(len(boxes)), key=key)


def subject_index(boxes: Sequence[Sequence[float]], width: int, height: int) -> int:
    """Index of the subject among face boxes (x0, y0, x1, y1) (:func:`subject_order`)."""
    if not len(boxes):
        raise ValueError("no face boxes to pick a subject from")
    return subject_order(boxes, width, height)[0]


# Where dlib's HOG box lies in a Haar face box (pipeline.align.detection.detect_faces) of the same
# face, as shares of its width / height (x0, y0, x1, y1): Haar boxes sit higher. Turns a Haar face
# into the box dlib's 68-point predictor was trained on. Medians over 2,276 LFW train photos
# (python scripts/calibrate_haar_box.py).
HAAR_TO_DLIB_BOX = (0.077, 0.164, 0.975, 1.037)


def dlib_box_from_haar(box: Sequence[float]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the box dlib's HOG detector would give the face of a Haar box (x, y, w, h)."""
    x, y, w, h = (float(v) for v in box)
    a, b, c, d = HAAR_TO_DLIB_BOX
    return x + a * w, y + b * h, x + c * w, y + d * h


# dlib's HOG face box in the ArcFace-112 crop of its own 5-point alignment: centre x, y and side
# (median over 3,685 LFW HOG faces; the boxes are square and upright). Turns another detector's
# five points into the box dlib's 68-point predictor was trained on.
DLIB_BOX_112 = (58.25, 72.2, 88.8)


def dlib_box_from_points(points: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in image pixels: the (upright, square) box dlib's HOG detector would give
    the face whose five points (eyes, nose tip, mouth corners) these are."""
    cx, cy, side = DLIB_BOX_112
    m = umeyama_similarity(points, TEMPLATE_5)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    (x, y), half = apply_matrix(cv2.invertAffineTransform(m), np.array([[cx, cy]]))[0], side / scale / 2
    return int(round(x - half)), int(round(y - half)), int(round(x + half)), int(round(y + half))


ARCFACE_112 = Template("arcface112", CROP_SIZE, TEMPLATE_5)
DLIB_150 = Template("dlib150", CHIP_SIZE, apply_matrix(similarity_from_eyes(*TEMPLATE_EYES, CHIP_EYES), TEMPLATE_5))
TEMPLATES = {t.name: t for t in (ARCFACE_112, DLIB_150)}
# what aligned data, shards and checkpoints written before templates existed hold
LEGACY_TEMPLATE = ARCFACE_112.name
# The member name of a masked twin aligned on its own, beside the pair's crops (the align stage
# writes it for align.standalone_twin_splits, pack carries it into train shards, the pair loader
# trains on it with train.augment.masked_geometry "detected").
STANDALONE_TWIN = "masked_standalone.jpg"


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown crop template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def crop_to_crop_matrix(src: Template, dst: Template) -> np.ndarray:
    """2x3 similarity: ``src`` crop pixels -> ``dst`` crop pixels (template points onto points;
    identity for the same template)."""
    return similarity_from_eyes(src.eyes[0], src.eyes[1], dst.eyes)


def retarget(matrix: np.ndarray, src: Template, dst: Template) -> np.ndarray:
    """A raw -> ``src``-crop matrix turned into the raw -> ``dst``-crop one."""
    m = np.vstack([crop_to_crop_matrix(src, dst), [0.0, 0.0, 1.0]]) @ np.vstack([matrix, [0.0, 0.0, 1.0]])
    return m[:2]


def eye_error_px(matrix: np.ndarray, landmarks: np.ndarray, template: Template = ARCFACE_112) -> float:
    """Largest distance between a mapped dlib eye centre and its template position, in ArcFace-112
    pixels (``matrix`` maps the image into ``template``'s crop; default ArcFace 112)."""
    mapped = apply_matrix(matrix, np.stack(eye_centres_from_landmarks(landmarks)))
    return float(np.linalg.norm(mapped - template.eyes, axis=1).max() / template.px_per_arcface_px)
