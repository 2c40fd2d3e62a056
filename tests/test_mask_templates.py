"""Procedural mask templates: every type/texture draws, deterministically, inside the warp anchors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import MASK_TEXTURES, MASK_TYPES
from pipeline.mask.landmarks import CANONICAL_112
from pipeline.mask.templates import (PALETTES, anchor_points, canonical_anchors, draw_template,
                                     get_template, outline_points, triangles)


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("texture", MASK_TEXTURES)
def test_every_type_and_texture_draws_an_opaque_mask_of_its_colour(mask_type, texture):
    colour = sorted(PALETTES[mask_type])[0]
    t = get_template(mask_type, colour, texture, 0)
    assert t.rgba.dtype == np.uint8 and t.rgba.shape[2] == 4
    alpha = t.rgba[..., 3]
    assert (alpha == 255).mean() > 0.2, "the mask body must be opaque"
    inner = cv2.erode((alpha == 255).astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    mean = t.rgba[..., :3][inner].reshape(-1, 3).mean(0)
    # shading/texture/print move the colour, but a plain surface keeps its palette colour roughly
    if texture == "plain" and mask_type != "gas":
        assert np.abs(mean - PALETTES[mask_type][colour]).max() < 45
    # anti-aliased edge: partial alpha exists along the outline
    assert ((alpha > 0) & (alpha < 255)).sum() > 100


def test_templates_are_deterministic_and_cached_per_process():
    a = get_template("cloth", "navy", "print", 3).rgba.copy()
    draw_template.cache_clear()
    b = get_template("cloth", "navy", "print", 3).rgba
    assert np.array_equal(a, b)
    assert get_template("cloth", "navy", "grain", 1) is get_template("cloth", "navy", "grain", 2), \
        "variants only matter for prints and N95 valves; other templates share one drawing"


def test_types_textures_and_variants_look_different():
    t = {m: get_template(m, sorted(PALETTES[m])[0], "plain", 0).rgba[..., 3] for m in MASK_TYPES}
    for a in MASK_TYPES:
        for b in MASK_TYPES:
            if a < b and {a, b} != {"n95", "gas"}:  # same dome; gas differs by its cartridges
                assert (t[a] != t[b]).mean() > 0.01, f"{a} and {b} have the same outline"
    prints = [get_template("cloth", "red", "print", v).rgba for v in range(4)]
    assert all(not np.array_equal(prints[0], p) for p in prints[1:])
    n95 = [get_template("n95", "white", "plain", v).rgba for v in (0, 1)]
    assert not np.array_equal(*n95), "odd N95 variants carry an exhalation valve"


def test_no_default_tint_every_type_offers_non_blue_colours():
    for mask_type, palette in PALETTES.items():
        non_blue = [c for c, (r, g, b) in palette.items() if not (b > r + 20 and b > g)]
        assert len(non_blue) >= 2, mask_type


def test_drawn_mask_stays_inside_the_outer_anchor_ring():
    """The warp only maps pixels inside the anchor triangulation: the drawing must fit in it."""
    anchors = canonical_anchors()
    n = len(outline_points(CANONICAL_112))
    hull = np.zeros(get_template("gas", "black", "plain", 0).rgba.shape[:2], np.uint8)
    cv2.fillPoly(hull, [np.round(anchors[n:2 * n]).astype(np.int32)], 1)
    for m in MASK_TYPES:
        alpha = get_template(m, sorted(PALETTES[m])[0], "pleats", 0).rgba[..., 3]
        assert alpha[hull == 0].max() == 0, f"{m} draws outside the anchors"


def test_triangulation_uses_every_anchor_and_keeps_orientation_on_the_canonical_face():
    tris = triangles()
    assert set(np.unique(tris)) == set(range(len(canonical_anchors())))
    pts = anchor_points(CANONICAL_112)[tris]
    u, v = pts[:, 1] - pts[:, 0], pts[:, 2] - pts[:, 0]
    area = u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]
    assert (np.abs(area) > 1.0).all()


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown mask type"):
        get_template("bandana", "red", "plain", 0)
    with pytest.raises(ValueError, match="unknown colour"):
        get_template("gas", "pink", "plain", 0)
    with pytest.raises(ValueError, match="unknown texture"):
        get_template("gas", "black", "sequins", 0)
