"""The mask stage's records read back: mask types (status.parquet) and face coverage (chunks)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MASK_TYPES
from pipeline.mask.records import (COVERAGE_BINS, MaskRecordError, coverage_bin, face_coverage, read_mask_records,
                                   read_mask_types)


def test_face_coverage_by_hand():
    mask = np.zeros((100, 100), np.uint8)
    mask[50:100, 20:80] = 255  # the lower half of the box below, 60 px wide
    assert face_coverage(mask, (20, 20, 80, 100)) == pytest.approx(50 * 60 / (80 * 60))
    mask[50:60, 20:80] = 100  # a soft edge under half counts as uncovered
    assert face_coverage(mask, (20, 20, 80, 100)) == pytest.approx(40 * 60 / (80 * 60))
    # the box reaching past the frame: its outside part is uncovered, not dropped from the area
    assert face_coverage(np.full((10, 10), 255, np.uint8), (-10, 0, 10, 10)) == pytest.approx(0.5)
    with pytest.raises(MaskRecordError, match="empty face box"):
        face_coverage(mask, (5, 5, 5, 9))


def test_coverage_bins_are_fixed_and_cover_zero_to_one():
    assert [coverage_bin(c) for c in (0.0, 0.39, 0.40, 0.49, 0.50, 1.0)] == [
        "below_0.40", "below_0.40", "0.40_0.50", "0.40_0.50", "above_0.50", "above_0.50"]
    assert [b[0] for b in COVERAGE_BINS] == ["below_0.40", "0.40_0.50", "above_0.50"]
    with pytest.raises(MaskRecordError):
        coverage_bin(1.5)


def test_records_of_the_real_mask_stage_agree_with_its_status(tiny_shards):
    masked = tiny_shards.parent / "masked"
    types = read_mask_types(masked)
    assert types and set(types.values()) <= set(MASK_TYPES)
    ids = sorted(types)[:10]
    records = read_mask_records(masked, ids)
    assert sorted(records) == ids
    assert all(records[i].mask_type == types[i] for i in ids)
    assert all(0.2 < r.coverage < 0.8 for r in records.values())  # a mask covers the lower face
    with pytest.raises(MaskRecordError, match="1 images have no record"):
        read_mask_records(masked, [*ids, "Nobody/Nobody_0001"])
    with pytest.raises(MaskRecordError, match="run the mask stage"):
        read_mask_types(masked.parent / "nowhere")
