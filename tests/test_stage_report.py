"""Status accounting and contact sheets shared by the image stages, and the streaming they rest
on: chunk results in input order as they finish, status written per chunk, accounting per chunk,
bounded contact-sheet picks."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ComputeParams
from pipeline.parallel import iter_chunks
from pipeline.seeding import rank_key
from pipeline.stage_report import (Accounting, SmallestK, StatusWriter, check_accounting, draw_sheet, fit_tile,
                                   write_status)


def _row(image_id: str, status: str = "masked", reason: str = "") -> dict:
    return {"image_id": image_id, "status": status, "reason": reason}


def test_accounting_accepts_every_image_once_done_or_rejected_with_a_reason():
    rows = [_row("a"), _row("b", "rejected", "no face"), _row("c")]
    check_accounting(rows, ["a", "b", "c"], "masked", RuntimeError)
    check_accounting(rows, None, "masked", RuntimeError)  # no manifest: uniqueness and statuses only


@pytest.mark.parametrize("rows,expected,why", [
    ([_row("a")], ["a", "b"], "ingested"),                                   # an image lost
    ([_row("a"), _row("a")], ["a"], "ingested"),                             # an image twice
    ([_row("a"), _row("x")], ["a", "b"], "ingested"),                        # one swapped for another
    ([_row("a"), _row("b", "rejected")], ["a", "b"], "with a reason"),       # rejected silently
    ([_row("a"), _row("b", "aligned")], ["a", "b"], "neither masked"),       # another stage's status
])
def test_accounting_refuses_lost_doubled_or_silent_rows(rows, expected, why):
    with pytest.raises(RuntimeError, match=why):
        check_accounting(rows, expected, "masked", RuntimeError)


def test_sheet_places_labelled_cells_in_rows():
    red, blue = np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    sheet = draw_sheet([[("one", [red, blue]), ("two", [blue, red])], [("three", [red, blue])]], 20)
    assert sheet.shape == (2 * (20 + 14 + 6) + 6, 2 * (2 * 20 + 6) + 6, 3)
    assert (sheet[6 + 14 + 5, 6 + 5] == [255, 0, 0]).all() and (sheet[6 + 14 + 5, 6 + 25] == [0, 0, 255]).all()
    tile = fit_tile(np.zeros((10, 40, 3), np.uint8), 20)  # letterboxed on white, aspect kept
    assert tile.shape == (20, 20, 3) and (tile[0, 10] == 255).all() and (tile[10, 10] == 0).all()


# ------------------------------------------------------------------------- streaming accounting

def _runs(*chunks: tuple[str, list[str]]):
    return iter(chunks)


def test_streaming_accounting_checks_each_chunk_against_the_manifest():
    acc = Accounting(_runs(("a.tar", ["a1", "a2"]), ("c.tar", ["c1"])), "masked", RuntimeError)
    acc.chunk("a.tar", [_row("a1"), _row("a2", "rejected", "no face")])
    acc.chunk("c.tar", [_row("c1")])
    acc.finish()
    assert acc.n_rows == 3


@pytest.mark.parametrize("chunks,why", [
    ([("a.tar", [_row("a1")]), ("c.tar", [_row("c1")])], r"in a\.tar: 2 ingested, 1 status rows"),  # a row lost
    ([("c.tar", [_row("c1")])], r"2 ingested image\(s\) of chunk a\.tar have no status row"),  # a chunk lost
    ([("a.tar", [_row("a1"), _row("a2")])], r"1 ingested image\(s\) of chunk c\.tar have no status row"),
    ([("a.tar", [_row("a1"), _row("a2")]), ("b.tar", [_row("b1")]), ("c.tar", [_row("c1")])],
     r"in b\.tar: 0 ingested, 1 status rows"),                                # a chunk the manifest lacks
    ([("a.tar", [_row("a1"), _row("a2")]), ("c.tar", [_row("c1"), _row("c1")])], "ingested"),  # twice
    ([("a.tar", [_row("a1"), _row("a2", "rejected")]), ("c.tar", [_row("c1")])], "with a reason"),
    ([("a.tar", [_row("a1"), _row("a2")]), ("a.tar", [_row("a1"), _row("a2")])], "must come in order"),
])
def test_streaming_accounting_refuses_lost_doubled_or_silent_rows(chunks, why):
    acc = Accounting(_runs(("a.tar", ["a1", "a2"]), ("c.tar", ["c1"])), "masked", RuntimeError)
    with pytest.raises(RuntimeError, match=why):
        for name, rows in chunks:
            acc.chunk(name, rows)
        acc.finish()


def test_accounting_without_a_manifest_still_refuses_an_id_in_two_chunks():
    acc = Accounting(None, "aligned", RuntimeError)
    acc.chunk("a.tar", [_row("x", "aligned")])
    with pytest.raises(RuntimeError, match="x in two chunks"):
        acc.chunk("b.tar", [_row("x", "aligned")])


def test_status_writer_writes_one_row_group_per_chunk_in_the_given_order(tmp_path):
    schema = pa.schema([("image_id", pa.string()), ("status", pa.string())])
    chunks = [[{"image_id": "b", "status": "ok", "extra": 1}, {"image_id": "c", "status": "ok"}],
              [], [{"image_id": "a", "status": "rejected"}]]
    with StatusWriter(tmp_path / "s.parquet", schema) as w:
        for rows in chunks:
            w.write(rows)
        assert not (tmp_path / "s.parquet").exists()  # appears when complete
    f = pq.ParquetFile(tmp_path / "s.parquet")
    assert f.num_row_groups == 2 and f.schema_arrow == schema
    assert [f.read_row_group(i).column("image_id").to_pylist() for i in range(2)] == [["b", "c"], ["a"]]
    # the same rows at once: the same table; no rows: an empty table with the schema
    write_status([r for rows in chunks for r in rows], schema, tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").equals(f.read())
    write_status([], schema, tmp_path / "e.parquet")
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    with pytest.raises(ValueError):  # a failed stage leaves no table behind
        with StatusWriter(tmp_path / "f.parquet", schema) as w:
            w.write(chunks[0])
            raise ValueError("stage failed")
    assert not list(tmp_path.glob("f.parquet*"))


def test_smallest_k_keeps_the_k_smallest_whatever_the_order():
    rng = np.random.default_rng(0)
    keys = [rank_key(0, f"id_{i}") for i in range(1000)]
    for order in (range(1000), rng.permutation(1000)):
        k = SmallestK(7)
        for i in order:
            k.add(keys[i], i)
        assert [keys[i] for i in k.items()] == sorted(keys)[:7]
    assert SmallestK(3).items() == []


def _sleep_then_return(x: float) -> float:
    time.sleep(x)
    return x


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_chunk_results_stream_in_input_order_as_they_finish(n_jobs):
    """What the stages build on: iter_chunks yields each result in input order as soon as it and
    the earlier ones are done, not all at the end (n_jobs=1: lazily, one call per result taken)."""
    items = [0.3, 0.0, 0.0, 2.0]
    got, at = [], []
    for x in iter_chunks(_sleep_then_return, items, ComputeParams(n_jobs=n_jobs)):
        got.append(x)
        at.append(time.monotonic())
    assert got == items
    assert at[-1] - at[0] > 1.0  # the first three came while the last one was still running
    calls = []
    gen = iter_chunks(calls.append, [1, 2, 3], ComputeParams(n_jobs=1))
    next(gen)
    assert calls == [1]
