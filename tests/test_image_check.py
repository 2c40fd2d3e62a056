"""Each kind of bad or unusual input gets the documented status and reason."""
from __future__ import annotations

import io
import struct
import sys
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_check import check_image
from tests.conftest import lfw_root


@pytest.fixture(scope="module")
def face_jpeg() -> bytes:
    return (lfw_root() / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").read_bytes()


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(c) -> Image.Image:
    return Image.open(io.BytesIO(c.data))


def test_plain_rgb_jpeg_is_stored_as_is(face_jpeg):
    c = check_image(face_jpeg)
    assert (c.status, c.ext, c.width, c.height, c.format) == ("accepted", "jpg", 250, 250, "JPEG")
    assert c.data == face_jpeg and c.reason == ""


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_modes_are_converted_to_rgb(face_jpeg, mode):
    im = Image.open(io.BytesIO(face_jpeg)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    c = check_image(_encode(im, fmt))
    assert c.status == "accepted" and c.ext == "png" and f"{mode}->" in c.reason
    assert _decode(c).mode == "RGB" and _decode(c).size == (250, 250)


def test_palette_with_transparency_is_composited_over_white():
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 0, 0] * 256)
    im.info["transparency"] = 0
    c = check_image(_encode(im, "PNG", transparency=0))
    assert c.status == "accepted"
    assert np.asarray(_decode(c)).min() == 255  # fully transparent black -> white


def test_16bit_png_is_scaled_to_8bit(face_jpeg):
    grey = np.asarray(Image.open(io.BytesIO(face_jpeg)).convert("L")).astype(np.uint16) * 257
    c = check_image(_encode(Image.fromarray(grey), "PNG"))
    assert c.status == "accepted" and "8-bit" in c.reason
    out = np.asarray(_decode(c))[..., 0]
    assert out.dtype == np.uint8 and abs(int(out.max()) - int(grey.max() // 257)) <= 1


def test_exif_orientation_is_applied(face_jpeg):
    im = Image.open(io.BytesIO(face_jpeg)).crop((0, 0, 250, 200))  # 250 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    c = check_image(_encode(im, "JPEG", exif=exif.tobytes()))
    assert c.status == "accepted" and "EXIF orientation 6" in c.reason
    assert (c.width, c.height) == (200, 250)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "PNG"])
def test_other_accepted_formats(face_jpeg, fmt):
    c = check_image(_encode(Image.open(io.BytesIO(face_jpeg)), fmt))
    assert c.status == "accepted" and c.format == fmt and c.ext == "png"


def test_rejections(face_jpeg):
    tiny = _encode(Image.new("RGB", (1, 1)), "PNG")
    gif = _encode(Image.new("RGB", (64, 64)), "GIF")
    cases = {
        "empty": (b"", "empty file"),
        "truncated": (face_jpeg[: len(face_jpeg) // 2], "truncated or corrupt"),
        "text": (b"name,identity\nnot an image\n", "not an image"),
        "html": (b"<html><body>404 Not Found</body></html>", "not an image"),
        "1x1": (tiny, "too small"),
        "gif": (gif, "unsupported image format GIF"),
        "bad_header": (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not an image"),
    }
    for name, (data, reason) in cases.items():
        c = check_image(data)
        assert c.status == "rejected", name
        assert reason in c.reason, (name, c.reason)
        assert c.data == b""


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height RGB pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return png + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    # A header claiming 30000 x 2000 pixels (under PIL's own limit), no pixel data: rejected from
    # the header, with its size. (Over twice PIL's limit PIL refuses to tell the size: see below.)
    c = check_image(_png_header(30000, 2000), max_pixels=40_000_000)
    assert c.status == "rejected" and c.width == 30000
    assert c.reason == "too many pixels: 30000x2000 = 60000000 exceeds ingest.max_pixels=40000000 (raise it to accept larger photos)"


def test_pil_global_limit_is_never_changed_under_threads():
    # Dask runs check_image in threads: PIL's process-wide MAX_IMAGE_PIXELS must never be touched
    # (an old save/None/restore could even leave it None for good when two threads interleave).
    before = Image.MAX_IMAGE_PIXELS
    png = _png_header(30000, 2000)  # over max_pixels, under PIL's own limit
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    def work(_):
        return {check_image(png).status for _ in range(300)}

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often so the watcher gets to look
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = set().union(*pool.map(work, range(4)))
    finally:
        stop.set()
        watcher.join()
        sys.setswitchinterval(old_interval)
        changed, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, before  # do not leak into other tests
    assert statuses == {"rejected"}
    assert seen == {before} and changed == before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_above_pils_own_limit_are_rejected_not_decoded():
    # ingest.max_pixels set above PIL's limit: PIL's limit still holds (we do not lift it), as a
    # rejection with a reason, both where PIL only warns (limit..2x) and where it raises (> 2x).
    pil = Image.MAX_IMAGE_PIXELS
    warn_band = _png_header(10_000, pil // 10_000 + 1)
    error_band = _png_header(20_000, pil // 10_000 + 1)
    for png in (warn_band, error_band):
        c = check_image(png, max_pixels=10 * pil)
        assert c.status == "rejected" and "decompression bomb" in c.reason, c.reason
        assert "PIL's own limit" in c.reason, c.reason
    with warnings.catch_warnings():  # under -W error the warning is an exception: same rejection
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        c = check_image(warn_band, max_pixels=10 * pil)
    assert c.status == "rejected" and "PIL's own limit" in c.reason
    assert Image.MAX_IMAGE_PIXELS == pil


def test_min_side_param(face_jpeg):
    assert check_image(face_jpeg, min_side=251).status == "rejected"
    assert check_image(face_jpeg, min_side=250).status == "accepted"
