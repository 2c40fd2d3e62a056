"""Status accounting and contact sheets shared by the image stages."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.stage_report import check_accounting, draw_sheet, fit_tile


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
