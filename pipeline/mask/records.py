"""What the mask stage recorded per image, read back for the stages after it: the mask type (pack
keeps ``pack.unseen_mask_types`` out of training) and how much of the face the mask covers
(evaluate and validate report figures per type and per coverage bin).

Coverage is the share of the detected face box (the mask stage's ``face_box``: dlib's HOG box, or
the fallback route's) under the mask (``mask.png`` > 127): about 0.3 for a mask low on the face to
0.65 for one pulled up to the eyes on LFW. The bins are fixed (:data:`COVERAGE_BINS`), not taken from
the data, so two data sets or two runs bin alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.config import ALL_MASK_TYPES
from pipeline.data.tar_chunks import list_chunks, read_chunk

# (name, low, high): coverage in [low, high); LFW's tertiles are about 0.42 and 0.50
COVERAGE_BINS = (("below_0.40", 0.0, 0.40), ("0.40_0.50", 0.40, 0.50), ("above_0.50", 0.50, 1.01))


class MaskRecordError(RuntimeError):
    pass


@dataclass(frozen=True)
class MaskRecord:
    mask_type: str
    coverage: float


def coverage_bin(coverage: float) -> str:
    for name, low, high in COVERAGE_BINS:
        if low <= coverage < high:
            return name
    raise MaskRecordError(f"mask coverage {coverage} outside [0, 1]")


def face_coverage(mask: np.ndarray, face_box) -> float:
    """Share of ``face_box`` (x0, y0, x1, y1; image pixels, may reach past the frame) under ``mask``;
    the part of the box outside the image counts as uncovered."""
    x0, y0, x1, y1 = (int(v) for v in face_box)
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        raise MaskRecordError(f"empty face box {list(face_box)}")
    h, w = mask.shape[:2]
    inside = mask[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] > 127
    return float(inside.sum()) / area


def read_mask_types(masked_dir: str | Path) -> dict[str, str]:
    """image_id -> mask type of every masked image (the mask stage's status.parquet)."""
    path = Path(masked_dir) / "status.parquet"
    if not path.is_file():
        raise MaskRecordError(f"{path} not found: run the mask stage")
    t = pq.read_table(path, columns=["image_id", "status", "mask_type"]).to_pydict()
    return {i: m for i, s, m in zip(t["image_id"], t["status"], t["mask_type"]) if s == "masked"}


def read_mask_records(masked_dir: str | Path, image_ids) -> dict[str, MaskRecord]:
    """{image_id: MaskRecord} for ``image_ids``, from the mask stage's chunks (json + mask.png);
    an id the mask stage did not mask is an error, never a silent gap."""
    wanted = set(image_ids)
    out: dict[str, MaskRecord] = {}
    for chunk in list_chunks(Path(masked_dir) / "chunks"):
        for _, members in read_chunk(chunk):
            info = json.loads(members.get("json", b"{}"))
            image_id = info.get("image_id")
            if image_id not in wanted:
                continue
            if info.get("mask_type") not in ALL_MASK_TYPES or "mask.png" not in members:
                raise MaskRecordError(f"{chunk.name}: {image_id} has no mask type or mask.png")
            mask = cv2.imdecode(np.frombuffer(members["mask.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise MaskRecordError(f"{chunk.name}: {image_id}'s mask.png does not decode")
            out[image_id] = MaskRecord(info["mask_type"], face_coverage(mask, info["face_box"]))
    missing = wanted - set(out)
    if missing:
        raise MaskRecordError(f"{len(missing)} images have no record in {masked_dir} (e.g. {sorted(missing)[:3]}): "
                              f"rerun the mask stage")
    return out
