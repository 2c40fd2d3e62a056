"""What every image stage writes besides its chunks: the per-image status table (with the
``in = done + rejected`` check), and a contact sheet to look at.

One home for both, so the mask and align stages account for their images the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHEET_PAD = 6
SHEET_LABEL_H = 14


def check_accounting(rows: list[dict], expected_ids: list[str] | None, done: str,
                     error: type[Exception]) -> None:
    """Every accepted ingest image has exactly one row, whose status is ``done`` or ``rejected``
    with a reason. ``rows`` must be sorted by image_id."""
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids) or (expected_ids is not None and ids != expected_ids):
        raise error(f"accounting broken: {len(expected_ids or [])} ingested, {len(ids)} status rows")
    bad = [r["image_id"] for r in rows
           if r["status"] not in (done, "rejected") or (r["status"] == "rejected" and not r["reason"])]
    if bad:
        raise error(f"accounting broken: {len(bad)} row(s) neither {done} nor rejected with a reason, "
                    f"e.g. {bad[0]}")


def write_status(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    """The status table: the schema's columns of every row, in row order."""
    cols = [f.name for f in schema]
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=schema), path)


def status_rows(out_dir: str | Path) -> list[dict]:
    return pq.read_table(Path(out_dir) / "status.parquet").to_pylist()


def fit_tile(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` scaled to fit a ``side`` x ``side`` white tile, centred."""
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), 255, np.uint8)
    oy, ox = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    tile[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return tile


def draw_sheet(rows: Sequence[Sequence[tuple[str, Sequence[np.ndarray]]]], side: int,
               font_scale: float = 0.34) -> np.ndarray:
    """A contact sheet: rows of cells, each cell a label above its tiles (side x side RGB) side by
    side. Returns RGB; :func:`write_png` saves it."""
    per_cell = max((len(tiles) for row in rows for _, tiles in row), default=1)
    cols = max((len(row) for row in rows), default=1)
    cell_w = per_cell * side + SHEET_PAD
    cell_h = side + SHEET_LABEL_H + SHEET_PAD
    sheet = np.full((max(len(rows), 1) * cell_h + SHEET_PAD, cols * cell_w + SHEET_PAD, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        y = SHEET_PAD + i * cell_h
        for j, (label, tiles) in enumerate(row):
            x = SHEET_PAD + j * cell_w
            for k, tile in enumerate(tiles):
                sheet[y + SHEET_LABEL_H:y + SHEET_LABEL_H + side, x + k * side:x + (k + 1) * side] = tile
            cv2.putText(sheet, label, (x, y + 10), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise OSError(f"could not write {path}")
