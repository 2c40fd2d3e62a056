"""What every image stage writes besides its chunks: the per-image status table (with the
``in = done + rejected`` check), and a contact sheet to look at.

One home for both, so the mask and align stages account for their images the same way. Everything
streams, chunk by chunk, so a stage's parent holds O(one chunk) of rows whatever the data set size:

- :class:`StatusWriter` appends each chunk's rows to the parquet table as the chunk finishes, one
  row group per chunk. Row order: chunk order (the sorted chunk names), image ids sorted within a
  chunk. Ingest plans its chunks over sorted ids per split, so this is (split, image_id) order and
  does not depend on the chunk size, the worker count or the backend.
- :class:`Accounting` checks each chunk's rows against the accepted ids the ingest manifest lists
  for that chunk, read as a stream (:func:`pipeline.data.ingest.accepted_ids_by_chunk`), and at the end
  that no manifest chunk was left out: every accepted image exactly once, done or rejected with a
  reason.
- :class:`SmallestK` keeps the contact-sheet picks: the k rows with the smallest rank keys.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from contextlib import closing
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHEET_PAD = 6
SHEET_LABEL_H = 14


def check_accounting(rows: list[dict], expected_ids: list[str] | None, done: str,
                     error: type[Exception], where: str = "") -> None:
    """Every accepted ingest image has exactly one row, whose status is ``done`` or ``rejected``
    with a reason. ``rows`` must be sorted by image_id (``expected_ids`` too); ``where`` names the
    chunk in the message."""
    ids = [r["image_id"] for r in rows]
    at = f" in {where}" if where else ""
    if len(set(ids)) != len(ids) or (expected_ids is not None and ids != expected_ids):
        raise error(f"accounting broken{at}: {len(expected_ids or [])} ingested, {len(ids)} status rows")
    bad = [r["image_id"] for r in rows
           if r["status"] not in (done, "rejected") or (r["status"] == "rejected" and not r["reason"])]
    if bad:
        raise error(f"accounting broken{at}: {len(bad)} row(s) neither {done} nor rejected with a reason, "
                    f"e.g. {bad[0]}")


class Accounting:
    """``in = done + rejected``, checked chunk by chunk as the rows come.

    ``expected``: (chunk file name, sorted accepted ids) runs in chunk order, as
    :func:`pipeline.data.ingest.accepted_ids_by_chunk` streams them from the manifest; None when there is
    no manifest (a folder not made by the ingest stage): then only statuses and uniqueness are
    checked, the latter with a set of every id (the one O(data set) fallback).
    Call :meth:`chunk` for every chunk in chunk order, then :meth:`finish`.
    """

    def __init__(self, expected: Iterator[tuple[str, list[str]]] | None, done: str, error: type[Exception]):
        self._runs, self.done, self.error = expected, done, error
        self._pending: tuple[str, list[str]] | None = None
        self._seen: set[str] | None = set() if expected is None else None
        self._last = ""
        self.n_rows = 0

    def _next_run(self) -> tuple[str, list[str]] | None:
        if self._pending is not None:
            run, self._pending = self._pending, None
            return run
        return next(self._runs, None)

    def chunk(self, name: str, rows: list[dict]) -> None:
        """Check one chunk's rows (sorted by image_id) against what the manifest lists for it."""
        if name <= self._last:
            raise self.error(f"accounting broken: chunk {name} after {self._last} (chunks must come in order)")
        self._last = name
        self.n_rows += len(rows)
        if self._runs is None:
            check_accounting(rows, None, self.done, self.error, where=name)
            ids = {r["image_id"] for r in rows}
            if ids & self._seen:
                raise self.error(f"accounting broken: {sorted(ids & self._seen)[0]} in two chunks")
            self._seen |= ids
            return
        expected: list[str] = []
        while (run := self._next_run()) is not None:
            if run[0] < name:  # a chunk the manifest fills that the stage never saw
                raise self.error(f"accounting broken: {len(run[1])} ingested image(s) of chunk {run[0]} have "
                                 f"no status row (the chunk is missing from the stage input), e.g. {run[1][0]}")
            if run[0] > name:
                self._pending = run
                break
            expected = run[1]
            break
        check_accounting(rows, expected, self.done, self.error, where=name)

    def finish(self) -> None:
        """Every manifest chunk was seen (nothing after the last chunk is left)."""
        if self._runs is None:
            return
        run = self._next_run()
        if run is not None:
            raise self.error(f"accounting broken: {len(run[1])} ingested image(s) of chunk {run[0]} have no "
                             f"status row (the chunk is missing from the stage input), e.g. {run[1][0]}")


class StatusWriter:
    """The status table, written as the chunks finish: the schema's columns of every row, one row
    group per :meth:`write` call, rows in the order given. The file appears at :meth:`close`
    (written under a temporary name first); the same rows give the same bytes."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._writer: pq.ParquetWriter | None = None
        self.row_groups = 0

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        cols = [f.name for f in self.schema]
        table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=self.schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._writer.write_table(table, row_group_size=len(rows))
        self.row_groups += 1

    def close(self) -> None:
        if self._writer is None:
            pq.write_table(self.schema.empty_table(), self._tmp)
        else:
            self._writer.close()
        self._tmp.replace(self.path)

    def __enter__(self) -> "StatusWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            if self._writer is not None:
                self._writer.close()
            self._tmp.unlink(missing_ok=True)


def write_status(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    """The status table of ``rows`` at once (one row group)."""
    with StatusWriter(path, schema) as w:
        w.write(rows)


def status_rows(out_dir: str | Path) -> list[dict]:
    return pq.read_table(Path(out_dir) / "status.parquet").to_pylist()


class SmallestK:
    """The ``k`` items with the smallest keys among those added (keys unique, e.g.
    :func:`pipeline.seeding.rank_key` of the image id): a bounded buffer, O(k) memory whatever is
    added. ``items()`` gives them by key."""

    def __init__(self, k: int):
        self.k = k
        self._buf: list[tuple[Any, Any]] = []

    def add(self, key: Any, item: Any) -> None:
        if self.k <= 0:
            return
        self._buf.append((key, item))
        if len(self._buf) >= 4 * self.k + 64:
            self._trim()

    def _trim(self) -> None:
        self._buf.sort(key=lambda kv: kv[0])
        del self._buf[self.k:]

    def items(self) -> list[Any]:
        self._trim()
        return [item for _, item in self._buf]


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


class StatusCounts:
    """Running counts of a stage's status rows (never the rows themselves): inputs, done (status
    ``DONE``), routes, rejection reasons and per-split counts. Stages add what else they report in
    :meth:`count_done`."""

    DONE = "done"

    def __init__(self) -> None:
        self.inputs = self.done = 0
        self.routes: Counter = Counter()
        self.reasons: Counter = Counter()
        self.splits: dict[str, Counter] = {}

    def reason_key(self, reason: str) -> str:
        return reason

    def count_done(self, row: dict) -> None:
        """Per-stage extras for one row whose status is ``DONE``."""

    def add(self, rows: list[dict]) -> None:
        self.inputs += len(rows)
        for r in rows:
            split = self.splits.setdefault(r["split"], Counter())
            split["images"] += 1
            if r["status"] != self.DONE:
                self.reasons[self.reason_key(r["reason"])] += 1
                continue
            split[self.DONE] += 1
            self.done += 1
            self.routes[r["route"]] += 1
            self.count_done(r)

    def split_counts(self) -> dict:
        return {s: {"images": c["images"], self.DONE: c[self.DONE]} for s, c in sorted(self.splits.items())}


def collect_chunk_rows(chunks: Sequence[Path], results: Iterator[list[dict]], *, accounting: Accounting,
                       status_path: Path, schema: pa.Schema,
                       on_rows: Callable[[Path, list[dict]], None]) -> None:
    """The per-image stages' collection loop: each finished chunk's rows (sorted by image id) are
    accounted, appended to the status table and handed to ``on_rows`` (running summary, sheet
    picks); at the end every ingested image must have a row. ``results`` yields in chunk order."""
    with closing(results), StatusWriter(status_path, schema) as status:
        for chunk, rows in zip(chunks, results):
            rows.sort(key=lambda r: r["image_id"])
            accounting.chunk(chunk.name, rows)
            status.write(rows)
            on_rows(chunk, rows)
        accounting.finish()
