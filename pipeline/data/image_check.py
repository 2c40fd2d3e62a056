"""Decode and vet one input image: accept it as 8-bit RGB or reject it with a reason.

Every later stage may then assume RGB, upright (EXIF orientation applied), sane size. A JPEG that
needs no change is stored as its original bytes (no generation loss); anything converted is stored
as lossless PNG.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "WEBP"}
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class CheckedImage:
    status: str  # "accepted" | "rejected"
    reason: str  # why rejected, or what was converted ("" when stored as-is)
    sha256: str
    width: int = 0
    height: int = 0
    format: str = ""
    data: bytes = b""  # bytes to store (accepted only)
    ext: str = ""  # "jpg" | "png"


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """Convert any PIL mode to 8-bit RGB; returns the image and a note of what changed."""
    mode = im.mode
    if mode == "RGB":
        return im, ""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), f"{mode}->8-bit RGB"
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode}->RGB over white"
    return im.convert("RGB"), f"{mode}->RGB"


def _pixel_limit(max_pixels: int) -> tuple[int, str]:
    """Our limit and its name: max_pixels, or PIL's own MAX_IMAGE_PIXELS where that is lower.

    PIL's global is only read, never set: setting it around Image.open is not thread-safe (Dask runs
    threads), and anything above it could not be decoded without changing it for the whole process.
    """
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and pil < max_pixels:
        return pil, (f"PIL's own limit Image.MAX_IMAGE_PIXELS={pil} against decompression bombs "
                     f"(ingest.max_pixels={max_pixels} is higher)")
    return max_pixels, f"ingest.max_pixels={max_pixels} (raise it to accept larger photos)"


def check_image(raw: bytes, *, min_side: int = 16, max_pixels: int = 40_000_000) -> CheckedImage:
    sha = hashlib.sha256(raw).hexdigest()
    if len(raw) == 0:
        return CheckedImage("rejected", "empty file (0 bytes)", sha)
    limit, limit_name = _pixel_limit(max_pixels)
    try:
        # Image.open reads the header only; PIL warns above its limit and raises above twice it.
        im = Image.open(io.BytesIO(raw))
        fmt = im.format or ""
        w, h = im.size
        if w * h > limit:
            return CheckedImage("rejected", f"too many pixels: {w}x{h} = {w * h} exceeds {limit_name}",
                                sha, w, h, fmt)
        if fmt not in ACCEPTED_FORMATS:
            return CheckedImage("rejected", f"unsupported image format {fmt or 'unknown'}", sha, w, h, fmt)
        im.load()
        n_frames = getattr(im, "n_frames", 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Over twice PIL's limit Image.open raises (the warning is one only under -W error).
        return CheckedImage("rejected", f"decompression bomb: above PIL's own limit: {err}", sha)
    except UnidentifiedImageError:
        return CheckedImage("rejected", "not an image (unidentified format)", sha)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return CheckedImage("rejected", f"truncated or corrupt image: {err}", sha)
    if min(w, h) < min_side:
        return CheckedImage("rejected", f"too small: {w}x{h}, min_side={min_side}", sha, w, h, fmt)
    notes = []
    if fmt == "MPO" or n_frames > 1:
        notes.append("first frame only")
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as err:  # noqa: BLE001 - a broken EXIF block is bad input, not a crash
            return CheckedImage("rejected", f"corrupt EXIF orientation: {err}", sha, w, h, fmt)
        notes.append(f"EXIF orientation {orientation} applied")
    im, converted = _to_rgb(im)
    if converted:
        notes.append(converted)
    w, h = im.size
    if fmt == "JPEG" and not notes:
        return CheckedImage("accepted", "", sha, w, h, fmt, raw, "jpg")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return CheckedImage("accepted", "; ".join(notes), sha, w, h, fmt, buf.getvalue(), "png")
