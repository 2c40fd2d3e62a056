"""Procedural RGBA mask templates (surgical, N95, KN95, cloth, gas), drawn by code, with anchor points.

Every template is drawn in one reference frame: the mean 68-point face (``CANONICAL_112``) scaled by
``SCALE``. The anchor points are functions of the 68 landmarks (:func:`anchor_points`), so the same
function gives the template's anchors (on the canonical face) and the target anchors (on a real
face), and :mod:`pipeline.mask.overlay` warps one onto the other piecewise over triangles. Types
differ in outline and details; colours come from per-type palettes (blue is one colour among many,
never a default tint); textures are plain, pleats, fabric grain or a print.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pipeline.config import MASK_TEXTURES, MASK_TYPES
from pipeline.mask.landmarks import CANONICAL_112

SCALE = 3.0  # template pixels per canonical-112 unit
ORIGIN = np.array([4.0, 40.0])  # canonical point drawn at template pixel (0, 0)
SIZE = (int(round((112 - 2 * 4.0) * SCALE)) + 6, int(round((138 - 40.0) * SCALE)))  # (w, h)
N_VARIANTS = 4  # per-image variation inside a (type, colour, texture) template: print kind, valve...

# Colour palettes per type (RGB). Names go into the per-image JSON.
PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "surgical": {"light_blue": (170, 205, 230), "white": (236, 238, 236), "black": (40, 40, 44),
                 "pink": (236, 182, 196), "mint": (176, 222, 200), "lavender": (200, 190, 228)},
    "n95": {"white": (232, 230, 224), "light_grey": (200, 200, 198), "beige": (226, 212, 186)},
    "kn95": {"white": (234, 234, 232), "black": (38, 38, 42), "grey": (150, 152, 156),
             "pink": (232, 176, 190), "navy": (52, 62, 102)},
    "cloth": {"navy": (40, 52, 92), "black": (34, 34, 36), "red": (168, 40, 44), "grey": (128, 128, 132),
              "beige": (210, 190, 160), "denim": (82, 108, 150), "olive": (104, 110, 64),
              "burgundy": (110, 30, 50)},
    "gas": {"black": (36, 36, 38), "dark_grey": (74, 76, 80), "olive": (78, 84, 58),
            "dark_blue": (40, 48, 70)},
}


@dataclass(frozen=True, eq=False)  # hashed by identity: templates are cached singletons
class Template:
    rgba: np.ndarray  # H x W x 4 uint8, premultiplied-free RGBA in the template frame
    anchors: np.ndarray  # N x 2 float, template pixels (same order as anchor_points)
    mask_type: str
    colour: str
    texture: str
    variant: int


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + t * (b - a)


def outline_points(L: np.ndarray) -> np.ndarray:
    """The reference mask outline (ring A) from 68 landmarks: over the nose bridge, along both jaw
    sides below the cheekbones, and down past the chin. Clockwise from the left cheek."""
    centre = 0.5 * (L[29] + L[57])
    top_mid = _lerp(L[28], L[29], 0.45)
    pts = [L[1], _lerp(L[1], top_mid, 0.5), top_mid, _lerp(L[15], top_mid, 0.5), L[15]]
    for i in range(14, 1, -1):  # jaw 14..2, pushed out a little, more near the chin
        k = 0.03 + 0.07 * max(0.0, 1.0 - abs(i - 8) / 4.0)
        pts.append(L[i] + k * (L[i] - centre))
    return np.array(pts)


def anchor_points(L: np.ndarray) -> np.ndarray:
    """Warp anchors: ring A (outline), ring B (outline pushed 18% outwards, room for the feathered
    edge and details) and interior points on the nose and mouth, so the mask follows the face."""
    ring_a = outline_points(L)
    centre = 0.5 * (L[29] + L[57])
    ring_b = ring_a + 0.18 * (ring_a - centre)
    interior = np.array([L[30], L[33], L[51], L[57]])
    return np.vstack([ring_a, ring_b, interior])


def to_template(pts: np.ndarray) -> np.ndarray:
    return (pts - ORIGIN) * SCALE


@lru_cache(maxsize=1)
def canonical_anchors() -> np.ndarray:
    return to_template(anchor_points(CANONICAL_112))


@lru_cache(maxsize=1)
def triangles() -> np.ndarray:
    """Delaunay triangles (index triples) of the canonical anchors, computed once and reused for
    every face so triangle i always maps template triangle i."""
    pts = canonical_anchors()
    w, h = SIZE
    sub = cv2.Subdiv2D((-2 * w, -2 * h, 5 * w, 5 * h))
    for p in pts:
        sub.insert((float(p[0]), float(p[1])))
    tris = []
    for t in sub.getTriangleList():
        tri = t.reshape(3, 2)
        idx = [int(np.argmin(np.hypot(*(pts - v).T))) for v in tri]
        if all(np.hypot(*(pts[i] - v)) < 1e-3 for i, v in zip(idx, tri)) and len(set(idx)) == 3:
            tris.append(sorted(idx))
    return np.array(sorted(tris), dtype=np.int32)


def _chaikin(pts: np.ndarray, n: int = 3, keep: tuple[int, ...] = ()) -> np.ndarray:
    """Closed-curve corner cutting: smooth outline; indices in keep stay sharp (KN95 fold points)."""
    for _ in range(n):
        out, new_keep = [], []
        m = len(pts)
        for i in range(m):
            p, q = pts[i], pts[(i + 1) % m]
            if i in keep:
                new_keep.append(len(out))
                out.append(p)
                out.append(0.75 * p + 0.25 * q)
            else:
                out += [0.75 * p + 0.25 * q]
            out.append(0.25 * p + 0.75 * q)
        pts, keep = np.array(out), tuple(new_keep)
    return pts


def _type_outline(mask_type: str, L: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Outline polygon of a mask type in canonical coordinates, and its sharp corner indices."""
    ring = outline_points(L)
    top_mid = ring[2]
    if mask_type in ("n95", "gas"):  # a dome: narrower at the top, round over the nose
        left = _lerp(ring[0], ring[-1], 0.35)
        right = _lerp(ring[4], ring[5], 0.35)
        pts = np.vstack([left, _lerp(left, top_mid, 0.55) + [0, -2.0], top_mid,
                         _lerp(right, top_mid, 0.55) + [0, -2.0], right, ring[6:-1]])
        return pts, ()
    if mask_type == "kn95":  # folded: a point over the nose bridge and at the chin
        chin = ring[11] + [0, 3.0]
        pts = np.vstack([ring[0], _lerp(ring[0], top_mid, 0.5) + [0, 1.5], top_mid + [0, -1.5],
                         _lerp(ring[4], top_mid, 0.5) + [0, 1.5], ring[4:11], chin, ring[12:]])
        return pts, (2, 11)
    if mask_type == "cloth":  # rounder: sides start a little lower, round chin
        left = _lerp(ring[0], ring[-1], 0.25)
        right = _lerp(ring[4], ring[5], 0.25)
        return np.vstack([left, ring[1:4] + [0, 0.8], right, ring[5:]]), ()
    return ring, ()  # surgical: the full outline, a wrapped rectangle


def _draw_alpha(poly: np.ndarray, keep: tuple[int, ...], smooth: int = 3) -> np.ndarray:
    """Anti-aliased alpha (float 0..1) of a smoothed polygon, drawn at 4x and area-downsampled."""
    ss = 4
    w, h = SIZE
    curve = _chaikin(to_template(poly), smooth, keep)
    big = np.zeros((h * ss, w * ss), np.uint8)
    cv2.fillPoly(big, [np.round(curve * ss * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _line(img: np.ndarray, pts: np.ndarray, value: float, thick: float) -> None:
    p = np.round(to_template(pts) * 16).astype(np.int32)
    cv2.polylines(img, [p], False, float(value), max(1, int(round(thick * SCALE))), cv2.LINE_AA, shift=4)


def _texture(texture: str, variant: int, base: np.ndarray, alpha: np.ndarray, mask_type: str,
             rng: np.random.Generator) -> np.ndarray:
    """Float RGB (0..255) of the mask surface with its texture."""
    h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = base
    shade = np.ones((h, w), np.float32)
    top = to_template(CANONICAL_112[29])[1]
    bottom = to_template(CANONICAL_112[8])[1]
    if texture == "pleats":
        n = 3 if mask_type in ("surgical", "cloth") else 5  # surgical pleats / respirator ribs
        depth = 0.16 if mask_type in ("surgical", "cloth") else 0.06
        phase = (yy - top) / max(bottom - top, 1.0) * n + 0.15 * variant
        saw = phase - np.floor(phase)  # each fold: light at its top, shadow line at its lower edge
        shade *= 1.0 + depth * (0.5 - saw) - depth * 1.2 * np.exp(-((1 - saw) / 0.06) ** 2)
    elif texture == "grain":
        f = 2 * np.pi / (1.1 * SCALE)
        weave = 0.5 * np.sin(xx * f + 1.3 * variant) * np.sin(yy * f)
        noise = rng.normal(0, 1, (h // 2 + 1, w // 2 + 1)).astype(np.float32)
        noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)[:h, :w]
        shade *= 1.0 + 0.07 * weave + 0.05 * noise
    elif texture == "print":
        lum = float(base.mean())
        ink = np.array([245, 245, 240] if lum < 110 else [30, 34, 60], np.float32)
        kind = variant % 4
        if kind == 0:  # polka dots
            s = 9 * SCALE
            gx = (xx + (yy // s % 2) * s / 2) % s - s / 2
            gy = yy % s - s / 2
            m = np.clip(1.4 * SCALE - np.hypot(gx, gy) + 0.5, 0, 1)
        elif kind == 1:  # diagonal stripes
            s = 7 * SCALE
            m = np.clip(np.abs(((xx + yy) % s) - s / 2) - s / 4 + 0.5, 0, 1)
        elif kind == 2:  # gingham checks
            s = 8 * SCALE
            bx = ((xx // s) % 2).astype(np.float32)
            by = ((yy // s) % 2).astype(np.float32)
            m = 0.35 * (bx + by)
        else:  # scattered small flowers: five petals around a centre
            m = np.zeros((h, w), np.float32)
            for _ in range(int(h * w / (22 * SCALE) ** 2 * 4)):
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                for k in range(5):
                    a = 2 * np.pi * k / 5 + cx
                    c = (int(cx + 2.2 * SCALE * np.cos(a)), int(cy + 2.2 * SCALE * np.sin(a)))
                    cv2.circle(m, c, int(1.6 * SCALE), 1.0, -1, cv2.LINE_AA)
                cv2.circle(m, (int(cx), int(cy)), int(1.0 * SCALE), 0.5, -1, cv2.LINE_AA)
            m = np.clip(m, 0, 1)
        rgb = rgb * (1 - m[..., None]) + ink * m[..., None]
    # every surface has a little fibre noise, so even "plain" is not a flat fill
    shade *= 1.0 + rng.normal(0, 0.012, (h, w)).astype(np.float32)
    return rgb * shade[..., None]


def _details(mask_type: str, variant: int, rgb: np.ndarray, alpha: np.ndarray, base: np.ndarray) -> None:
    """Type-specific features drawn on top: bindings, seams, folds, valves, filter cartridges."""
    L = CANONICAL_112
    dist = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3) / SCALE
    shade = np.ones(alpha.shape, np.float32)
    # rim: the mask curves away from the light at its edges
    shade *= 1.0 - 0.18 * np.exp(-dist / 2.5)
    # cylinder: the sides face away from the camera
    cx = to_template(L[30])[0]
    half = (to_template(L[14])[0] - to_template(L[2])[0]) / 2
    xx = np.arange(alpha.shape[1], dtype=np.float32)
    shade *= (1.0 - 0.22 * np.clip((xx - cx) / half, -1.2, 1.2) ** 2)[None, :]
    lines = np.zeros(alpha.shape, np.float32)
    ring = outline_points(L)
    if mask_type == "surgical":
        band = (dist < 2.2).astype(np.float32)  # stitched binding along top and bottom edges
        shade *= 1.0 - 0.08 * band
        _line(lines, _lerp(ring[:5], ring[2][None], 0.0) + [0, 1.8], 0.35, 0.35)
    elif mask_type in ("cloth",):
        seam = np.array([_lerp(L[28], L[29], 0.6), L[30] + [0, 2], L[33] + [0, 3], L[51] + [0, 2],
                         L[57] + [0, 2], L[8] + [0, 4]])
        _line(lines, seam, 0.45, 0.45)
    elif mask_type == "kn95":
        fold = np.array([_lerp(L[28], L[29], 0.45) + [0, -1.5], L[30], L[33], L[57], L[8] + [0, 6]])
        _line(lines, fold, 0.55, 0.5)
        xs = to_template(fold)[:, 0]
        # the side facing away from the fold is darker: two planes meeting at the fold
        left = xx[None, :] < np.interp(np.arange(alpha.shape[0]), to_template(fold)[:, 1], xs)[:, None]
        shade *= np.where(left, 0.93, 1.0)
        weld = dist < 1.6  # welded edge seam
        shade *= np.where(weld & (dist > 0.9), 0.85, 1.0)
    elif mask_type == "n95":
        _line(lines, np.array([_lerp(L[28], L[29], 0.5), L[33], L[57], L[8] + [0, 4]]), 0.25, 0.3)
        if variant % 2:  # exhalation valve
            c = to_template(0.5 * (L[57] + L[5]) + [0, -2])
            cv2.circle(rgb, tuple(int(v) for v in c), int(7 * SCALE), (base * 0.6).tolist(), -1, cv2.LINE_AA)
            cv2.circle(rgb, tuple(int(v) for v in c), int(5 * SCALE), (base * 0.82).tolist(), -1, cv2.LINE_AA)
    elif mask_type == "gas":
        # cartridge colour follows the body (P100 magenta on black, light grey on grey...)
        grey = {36: (170, 60, 120), 74: (176, 178, 180), 78: (150, 140, 100)}.get(
            int(base[0]), (150, 152, 156))
        grey = np.array(grey, np.float32)
        h, w = alpha.shape
        yy, xx2 = np.mgrid[0:h, 0:w].astype(np.float32)
        for j, tilt in ((4, 1.0), (12, -1.0)):  # filter cartridges on both lower cheeks, facing sideways
            c = to_template(_lerp(L[j], L[57], 0.12) + [0, -2.0])
            r = 12.5 * SCALE
            axes = (int(r * 0.72), int(r))
            disc = np.zeros((h, w), np.float32)
            cv2.ellipse(disc, tuple(int(v) for v in c), axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA)
            # a lit cylinder: bright upper edge towards the nose, dark lower outer edge, a rim
            u, v = (xx2 - c[0]) / axes[0], (yy - c[1]) / axes[1]
            light = 1.0 + 0.35 * (tilt * u - v) / 2.0 - 0.35 * np.clip(np.hypot(u, v) - 0.8, 0, 1) * 4
            can = grey[None, None, :] * light[..., None]
            rgb[:] = rgb * (1 - disc[..., None]) + can * disc[..., None]
            for k in range(-3, 4):  # grille slots
                y = int(c[1] + k * r * 0.2)
                half = axes[0] * 0.55 * np.sqrt(max(0.0, 1 - (k * 0.2) ** 2))
                cv2.line(rgb, (int(c[0] - half), y), (int(c[0] + half), y),
                         (grey * 0.55).tolist(), max(1, int(SCALE * 0.6)), cv2.LINE_AA)
            alpha[:] = np.maximum(alpha, disc)
        body = base * 1.6 + 25  # exhalation valve cover: lighter plastic with slits
        c = to_template(_lerp(L[57], L[8], 0.35))
        axes = (int(8 * SCALE), int(6 * SCALE))
        cv2.ellipse(rgb, tuple(int(v) for v in c), axes, 0, 0, 360, body.tolist(), -1, cv2.LINE_AA)
        for k in (-2, -1, 0, 1, 2):
            x = int(c[0] + k * 2.6 * SCALE)
            cv2.line(rgb, (x, int(c[1] - 3 * SCALE)), (x, int(c[1] + 3 * SCALE)), (body * 0.55).tolist(),
                     max(1, int(SCALE * 0.7)), cv2.LINE_AA)
    rgb *= (shade * (1.0 - lines))[..., None]


def get_template(mask_type: str, colour: str, texture: str, variant: int) -> Template:
    """The template for a (type, colour, texture, variant), drawn once per process and cached.
    Drawing is seeded by these names only, so every worker draws identical pixels. The variant only
    matters for prints (pattern kind) and N95 (valve or not), so other templates share one drawing."""
    if texture != "print":
        variant = variant % 2 if mask_type == "n95" else 0
    return draw_template(mask_type, colour, texture, variant)


@lru_cache(maxsize=256)
def draw_template(mask_type: str, colour: str, texture: str, variant: int) -> Template:
    """The drawing behind :func:`get_template`, cached per process (call that: it folds the variants
    that draw alike into one)."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type {mask_type!r}; allowed: {list(MASK_TYPES)}")
    if texture not in MASK_TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; allowed: {list(MASK_TEXTURES)}")
    if colour not in PALETTES[mask_type]:
        raise ValueError(f"unknown colour {colour!r} for {mask_type}; allowed: {list(PALETTES[mask_type])}")
    seed = int.from_bytes(f"{mask_type}/{colour}/{texture}/{variant}".encode()[:32].ljust(32, b"\0"), "little")
    rng = np.random.default_rng(seed % (2 ** 63))
    base = np.array(PALETTES[mask_type][colour], np.float32)
    poly, keep = _type_outline(mask_type, CANONICAL_112)
    alpha = _draw_alpha(poly, keep, smooth={"kn95": 1, "surgical": 2}.get(mask_type, 3))
    rgb = _texture(texture, variant, base, alpha, mask_type, rng)
    _details(mask_type, variant, rgb, alpha, base)
    rgba = np.dstack([np.clip(rgb, 0, 255), np.clip(alpha * 255.0, 0, 255)])
    rgba = np.round(rgba).astype(np.uint8)
    rgba.flags.writeable = False
    return Template(rgba, canonical_anchors(), mask_type, colour, texture, variant)
