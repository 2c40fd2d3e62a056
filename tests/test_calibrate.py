"""`python -m pipeline.calibrate` on a labelled folder of real LFW photos, some masked, then
`identify --thresholds` reading what it wrote."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import lfw_root
from tests.test_cli import cli, in_process, masked_copy

# people with >= 4 photos in LFW: 2 enrolled (mean template) and 2 searching each
PEOPLE = ["Ariel_Sharon", "Colin_Powell", "Donald_Rumsfeld", "George_W_Bush", "Gerhard_Schroeder",
          "Hugo_Chavez", "Jacques_Chirac", "Jean_Chretien", "John_Ashcroft", "Junichiro_Koizumi",
          "Serena_Williams", "Tony_Blair"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 people x 4 photos, the 4th of each masked by the project's mask overlay; one file that
    does not decode."""
    root = tmp_path_factory.mktemp("labelled")
    lfw = lfw_root() / "lfw-deepfunneled"
    for name in PEOPLE:
        (root / name).mkdir()
        for n in (1, 2, 3):
            shutil.copy(lfw / name / f"{name}_{n:04d}.jpg", root / name)
        masked_copy(lfw / name / f"{name}_0004.jpg", root / name / f"{name}_0004_masked.jpg")
    (root / "Tony_Blair" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_calibrate_writes_thresholds_identify_then_uses(labelled, tmp_path, capsys):
    out = tmp_path / "mine.json"
    p = cli("pipeline.calibrate", labelled, "--model", "dlib", "--out", out, "--replicates", "50")
    assert p.returncode == 0, p.stderr
    entry = json.loads(out.read_text())["dlib"]
    block = entry["one_to_n"]
    assert entry["model_sha256"] == "dlib" and entry["template"] == "dlib150"
    assert (block["people"], block["enrolled"], block["photos"]) == (12, 12, 49)
    assert block["photos_not_embedded"] == 1 and sum(block["not_embedded_reasons"].values()) == 1
    assert (block["mated_searches"], block["nonmated_searches"]) == (24, 48)  # 4 photos: 2 enrol, 2 search; all 4 strangers
    assert block["measured_up_to_gallery_size"] == 11
    # 48 stranger searches cannot measure FPIR 1e-2 or 1e-1 (10 false positives needed): said so
    assert all(t is None for t in block["fpir"]["1e-1"].values()) and block["at_gallery_size"]["1e-1"] is None
    assert json.loads(p.stdout)["photos_not_embedded"] == 1
    probe = labelled / "Colin_Powell" / "Colin_Powell_0001.jpg"
    p = cli("pipeline.identify", probe, "--gallery", labelled, "--model", "dlib", "--thresholds", out)
    assert p.returncode == 2 and "out of reach of the 48 stranger searches" in p.stderr
    # refusals through the commands' own main(), in this process
    from pipeline.calibrate import main as calibrate_main
    from pipeline.identify import main as identify_main

    # a file of thresholds for another model only: refused by its sha256, not used
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"x": {**entry, "model_sha256": "0" * 64}}))
    rc, err = in_process(identify_main, capsys, probe, "--gallery", labelled, "--model", "dlib", "--thresholds", other)
    assert rc == 2 and "no thresholds for this model" in err
    rc, err = in_process(calibrate_main, capsys, tmp_path / "nowhere", "--model", "dlib", "--out", out)
    assert rc == 2 and "not a folder" in err
