"""Geometry of the ArcFace 112x112 crop: the template, similarity transforms, warping.

Kept apart from the detectors so the crop layout has one home that every consumer (align stage,
dlib reference embedder, calibration script) imports without pulling in cascades or dlib.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

CROP_SIZE = 112
# ArcFace (insightface) 112x112 template: eye (image-left), eye (image-right), nose, mouth corners.
TEMPLATE_5 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                       [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_EYES = TEMPLATE_5[:2]


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


def eye_error_px(matrix: np.ndarray, landmarks: np.ndarray) -> float:
    """Largest distance (crop pixels) between a mapped dlib eye centre and its template position."""
    mapped = apply_matrix(matrix, np.stack(eye_centres_from_landmarks(landmarks)))
    return float(np.linalg.norm(mapped - TEMPLATE_EYES, axis=1).max())
