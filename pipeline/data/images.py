"""The one image decoder and JPEG encoder of the pipeline (RGB uint8 numpy arrays everywhere).

JPEG goes through simplejpeg (libjpeg-turbo, ~2x PIL on 112 px crops); anything else (the PNGs that
ingest stores for non-JPEG inputs, masks) through OpenCV. Every stage decodes the same bytes to the
same pixels, which is what keeps a raw image and its masked twin identical outside the mask.
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
