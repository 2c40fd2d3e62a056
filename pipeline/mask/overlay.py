"""Put a mask template onto a face: piecewise-affine warp over landmark anchors, feathered
anti-aliased edge, brightness/colour matched to the face, shading taken from the photo's own light.

Only the region around the subject's lower face is touched (a region of interest), which keeps one
overlay at ~1-2 ms on a 250x250 image and leaves bystanders and background untouched.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from pipeline.mask.templates import Template, anchor_points, triangles

# Mean skin colour (RGB) of LFW faces under normal exposure: the reference for light and white
# balance. A face brighter/darker or warmer/cooler than this moves the mask the same way.
SKIN_REF = np.array([178.0, 132.0, 110.0], np.float32)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _affines(src: np.ndarray, dst: np.ndarray, tris: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine dst->src of every triangle at once (T x 2 x 3), and which triangles are usable."""
    d = np.concatenate([dst[tris], np.ones((len(tris), 3, 1))], axis=2)  # T x 3 x 3
    det = np.linalg.det(d)
    ok = np.abs(det) > 1e-3  # degenerate under an extreme head turn: neighbours cover the spot
    d[~ok] = np.eye(3)
    m = np.linalg.solve(d, src[tris])  # T x 3 x 2: [x y 1] @ m = src
    return np.transpose(m, (0, 2, 1)), ok


def warp_template(rgba: np.ndarray, src: np.ndarray, dst: np.ndarray, tris: np.ndarray,
                   roi: tuple[int, int, int, int]) -> np.ndarray:
    """Template RGBA (float32) warped into roi = (x0, y0, x1, y1): each pixel takes the affine
    dst->src of the triangle covering it, then one remap samples the template."""
    x0, y0, x1, y1 = roi
    w, h = x1 - x0, y1 - y0
    dst = dst - [x0, y0]
    m, ok = _affines(src, dst, tris)
    index = np.zeros((h, w), np.int32)
    coeffs = np.zeros((len(tris) + 1, 6), np.float32)
    coeffs[0] = [0, 0, -10, 0, 0, -10]  # outside every triangle: sample off the template (alpha 0)
    coeffs[1:] = m.reshape(len(tris), 6)
    pts = np.round(dst * 16).astype(np.int32)
    for k in np.flatnonzero(ok):
        cv2.fillConvexPoly(index, pts[tris[k]], int(k) + 1, cv2.LINE_8, shift=4)
    c = coeffs[index]
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    map_x = c[..., 0] * xx + c[..., 1] * yy + c[..., 2]
    map_y = c[..., 3] * xx + c[..., 4] * yy + c[..., 5]
    return cv2.remap(rgba, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=(0, 0, 0, 0)).astype(np.float32)


@lru_cache(maxsize=512)
def _scaled(template: Template, level: int) -> np.ndarray:
    """The template area-downscaled by 2**(-level/4): a small cache of sizes instead of a resize
    per image, so the warp never samples a much larger image (aliasing)."""
    f = 2.0 ** (-level / 4.0)
    h, w = template.rgba.shape[:2]
    return cv2.resize(template.rgba, (max(2, round(w * f)), max(2, round(h * f))), interpolation=cv2.INTER_AREA)


def smooth_light(luma: np.ndarray, alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Alpha-weighted low-pass of the face luminance under the mask, computed at quarter size
    (it is smooth by construction, and this is the costliest filter of the overlay)."""
    h, w = luma.shape
    f = 4 if min(h, w) >= 32 else 1
    small = (max(1, w // f), max(1, h // f))
    both = cv2.resize(np.dstack([luma * alpha, alpha]), small, interpolation=cv2.INTER_AREA)
    both = cv2.GaussianBlur(both, (0, 0), max(sigma / f, 0.5))
    light = both[..., 0] / np.maximum(both[..., 1], 1e-3)
    return cv2.resize(light, (w, h), interpolation=cv2.INTER_LINEAR)


def overlay_mask(rgb: np.ndarray, landmarks: np.ndarray, template: Template, *, feather_px: float = 1.5,
                 match_brightness: bool = True, shading: bool = True,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masked copy of ``rgb`` (uint8 H x W x 3) and the binary mask (uint8 H x W, 0/255).

    ``rng`` (seeded per image by the caller) adds sensor grain at the photo's own noise level, so the
    mask is not cleaner than the face around it; None adds no grain.
    """
    h, w = rgb.shape[:2]
    dst = anchor_points(np.asarray(landmarks, np.float64))
    src = template.anchors.copy()
    pad = int(np.ceil(3 * feather_px)) + 2
    x0, y0 = np.floor(dst.min(0)).astype(int) - pad
    x1, y1 = np.ceil(dst.max(0)).astype(int) + pad
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = rgb.copy()
    mask = np.zeros((h, w), np.uint8)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return out, mask
    # Shrink the template close to the face size first (area filter), so the warp does not alias.
    tpl = template.rgba
    scale = np.ptp(dst[:, 0]) / max(np.ptp(src[:, 0]), 1e-6)
    level = int(np.clip(np.floor(-4.0 * np.log2(max(1.25 * scale, 1e-6))), 0, 16))
    if level > 0:
        tpl = _scaled(template, level)
        src = src * [tpl.shape[1] / template.rgba.shape[1], tpl.shape[0] / template.rgba.shape[0]]
    warped = warp_template(tpl, src, dst, triangles(), (x0, y0, x1, y1))
    alpha = warped[..., 3] / 255.0
    if feather_px > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather_px * 0.6)
    face = rgb[y0:y1, x0:x1].astype(np.float32)
    covered = alpha > 0.5
    colour = warped[..., :3]
    if match_brightness and covered.any():
        # exposure and white balance of the face itself (the covered skin), not the whole photo
        mean = face[covered].mean(0)
        gain = float(np.clip((mean @ LUMA) / (SKIN_REF @ LUMA), 0.3, 1.3)) ** 0.5
        cast = np.clip(((mean / max(mean.mean(), 1.0)) / (SKIN_REF / SKIN_REF.mean())) ** 0.5, 0.88, 1.12)
        colour = colour * (gain * cast).astype(np.float32)
    if shading and covered.any():
        # the photo's own low-frequency light (one side in shadow, light from above) on the mask
        luma = face @ LUMA
        sigma = max(2.0, 0.12 * np.ptp(dst[:18, 0]))
        light = smooth_light(luma, alpha, sigma)
        ref = float(np.median(light[covered]))
        colour = colour * np.clip((light / max(ref, 1.0)) ** 0.6, 0.55, 1.35).astype(np.float32)[..., None]
    # match the photo's softness and grain: a clean render on a soft JPEG face looks pasted
    colour = cv2.GaussianBlur(colour, (0, 0), 0.6)
    if rng is not None and covered.any():
        hf = face - cv2.GaussianBlur(face, (0, 0), 1.0)
        level = float(np.clip(hf[covered].std() * 0.6, 0.5, 6.0))
        grain = rng.standard_normal((y1 - y0, x1 - x0, 1), dtype=np.float32) * level
        colour = colour + grain
    a = alpha[..., None]
    blend = face + (colour - face) * a
    out[y0:y1, x0:x1] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)  # round half up, then clip
    mask[y0:y1, x0:x1] = np.where(covered, 255, 0).astype(np.uint8)
    return out, mask
