"""The one image decoder and JPEG encoder of the pipeline (RGB uint8 numpy arrays everywhere).

JPEG goes through simplejpeg (libjpeg-turbo, ~2x PIL on 112 px crops); anything else (the PNGs that
ingest stores for non-JPEG inputs, masks) through OpenCV. Every stage decodes the same bytes to the
same pixels, which is what keeps a raw image and its masked twin identical outside the mask.

A masked twin is stored as the patch the mask changed over its raw photo (:func:`overlay_patch`,
written by the mask stage) and rebuilt from the raw photo's own pixels (:func:`apply_overlay`, by
the align stage and the scripts that look at twins): one home for both ends of that format, below
the mask and align packages that share it.
"""
from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

JPEG_MAGIC = b"\xff\xd8"


class ImageCodecError(ValueError):
    pass


def decode_rgb(data: bytes) -> np.ndarray | None:
    """HxWx3 uint8 RGB, or None when the bytes are not a decodable image."""
    if data[:2] == JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if arr is None else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def decode_gray(data: bytes) -> np.ndarray | None:
    """HxW uint8 (binary masks are stored as PNG)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG (4:2:0) of an RGB image; deterministic for the same pixels and quality."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageCodecError("JPEG encoding failed")
    return buf.tobytes()


def decode_rgba(data: bytes) -> np.ndarray | None:
    """HxWx4 uint8 RGBA of a PNG with alpha (mask-bank entries), or None."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 4 or arr.dtype != np.uint8:
        return None
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)


def encode_png(image: np.ndarray, compression: int = 3) -> bytes:
    """Lossless PNG of an RGB or RGBA (converted for OpenCV) or single-channel image."""
    if image.ndim == 3:
        arr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    else:
        arr = image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ImageCodecError("PNG encoding failed")
    return buf.tobytes()


# ----------------------------------------------------- a masked twin, stored as a patch over its raw photo
def overlay_patch(raw: np.ndarray, masked: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The smallest box [x0, y0, x1, y1] holding every pixel the overlay changed, and the masked
    image inside it. Stored losslessly, it lets the align stage rebuild the masked twin from the
    raw photo's own pixels: both twins are then JPEG-encoded once, at the same quality, and are
    bit-identical outside the mask (no compression cue for the network to learn)."""
    changed = np.any(raw != masked, axis=2)
    ys, xs = np.nonzero(changed)
    if not len(xs):
        return [0, 0, 0, 0], masked[:0, :0]
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return [x0, y0, x1, y1], np.ascontiguousarray(masked[y0:y1, x0:x1])


def apply_overlay(raw: np.ndarray, box: list[int], patch: np.ndarray) -> np.ndarray:
    """The masked twin: ``raw`` with ``patch`` pasted at ``box`` (inverse of :func:`overlay_patch`)."""
    x0, y0, x1, y1 = box
    if patch.shape[:2] != (y1 - y0, x1 - x0) or x1 > raw.shape[1] or y1 > raw.shape[0]:
        raise ValueError(f"overlay patch {patch.shape[:2]} does not fit box {box} in image {raw.shape[:2]}")
    out = raw.copy()
    out[y0:y1, x0:x1] = patch
    return out
