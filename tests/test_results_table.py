"""scripts/results_table.py on a hand-made metrics.json: the cells, the verdicts, the left-out points."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from results_table import table  # noqa: E402


def _block(rank1: float, acc: float) -> dict:
    ver = {c: {"accuracy": acc, "accuracy_ci": {"low": acc - 0.02, "high": acc + 0.01},
               "tar_at_far_1e-2": None, "tar_at_far_1e-3": None, "far_min_reachable": 0.02,
               "pairs_different": 500}
           for c in ("unmasked_unmasked", "masked_unmasked", "masked_masked")}
    return {"gallery": {"rank1": {"mask_1.0": rank1}, "rank1_ci": {"mask_1.0": {"low": rank1 - 0.05,
                                                                                "high": rank1 + 0.05}}},
            "verification": ver, "verification_view2": {"skipped": 1},
            "open_set": {"dir_at_fpir_1e-1": {"mask_1.0": None}}}


def test_cells_verdicts_and_unreachable_points():
    m = _block(0.643, 0.954)
    m["reference"] = {"dlib": _block(0.363, 0.906)}
    m["vs_dlib"] = {"gallery": {"rank1": {"mask_1.0": {"diff": 0.28, "low": 0.233, "high": 0.325, "verdict": 1}}},
                    "verification": {c: {"accuracy": {"diff": 0.048, "low": -0.001, "high": 0.07, "verdict": 0}}
                                     for c in ("unmasked_unmasked", "masked_unmasked", "masked_masked")}}
    rows = table(m).splitlines()
    assert rows[2] == ("| gallery rank-1, probes mask 1.0 | 64.3 [59.3, 69.3] | 36.3 [31.3, 41.3] | "
                       "+28.0 [+23.3, +32.5] | better |")
    # +4.8 points, but the interval holds 0: within noise, whatever the point difference says
    assert "| View 1 DevTest m-u accuracy | 95.4 [93.4, 96.4] | 90.6 [88.6, 91.6] | +4.8 [-0.1, +7.0] | " \
           "within noise |" in rows
    # unreachable TAR@FAR, a skipped View 2 and an unreachable DIR give no row, only the note
    assert not any("TAR @ FAR" in r and r.startswith("|") for r in rows)
    assert not any("View 2" in r or "DIR" in r for r in rows)
    assert rows[-1] == "- View 1 DevTest: TAR @ FAR 1e-2, 1e-3 not reported (500 impostor pairs reach FAR >= 0.02)"


def test_by_mask_rows_seen_unseen_gap_types_and_coverage():
    m = _block(0.643, 0.954)
    b = {"seen": 0.96, "seen_ci": {"low": 0.95, "high": 0.97}, "unseen": 0.93, "unseen_ci": None,
         "seen_minus_unseen": 0.03, "seen_minus_unseen_ci": {"low": 0.01, "high": 0.05},
         "type": {"gas": 0.9, "kn95": None}, "coverage": {"below_0.40": 0.97}, "count": {}}
    m["by_mask"] = {"unseen_types": ["gas", "kn95", "n95"], "verification_masked_unmasked": b}
    m["vs_dlib"] = {"by_mask": {"verification_masked_unmasked": {"seen_minus_unseen": {
        "diff": -0.02, "low": -0.04, "high": -0.001, "verdict": -1}}}}
    rows = table(m).splitlines()
    assert "| View 1 m-u accuracy, mask types seen in training | 96.0 [95.0, 97.0] | n/a | n/a | n/a |" in rows
    assert "| View 1 m-u accuracy, unseen types (gas/kn95/n95) | 93.0 | n/a | n/a | n/a |" in rows
    assert ("| View 1 m-u accuracy, seen - unseen | 3.0 [1.0, 5.0] | n/a | -2.0 [-4.0, -0.1] | smaller gap |") in rows
    assert "| View 1 m-u accuracy, type gas | 90.0 | n/a | n/a | n/a |" in rows
    assert not any("kn95 |" in r for r in rows)  # no pair of that type: no row
    assert "| View 1 m-u accuracy, face coverage below 0.40 | 97.0 | n/a | n/a | n/a |" in rows
