"""Overlap by face: an ImageFolder whose numbered folders hide LFW people is caught, and pack
drops or refuses them; calibration and matching pinned on hand-made embeddings."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.config import AlignParams, ComputeParams, DatasetParams, EvaluateParams, IngestParams, MaskParams, \
    OverlapParams, PackParams
from pipeline.metrics import l2_normalize
from pipeline.evaluate.overlap import calibrate_threshold, find_overlap, run_overlap
from pipeline.pack.stage import PackError, run_pack
from tests.conftest import lfw_root


def _unit(v):
    return l2_normalize(np.asarray(v, np.float32))


def test_threshold_and_matches_by_hand():
    """3 LFW people on axes 0, 1, 2, two photos each (one a little off-axis): half-centroids of a
    person score ~1, of two people ~0; with 6 different pairs FAR 1e-4 cannot be measured, so the
    threshold sits just above the highest different score. A training person on axis 1 is caught
    as LFW person B; one on axis 5 is not."""
    lfw_ids = ["A", "A", "B", "B", "C", "C"]
    lfw = _unit([[1, 0, 0, 0, 0, 0], [1, 0.1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 0.1, 0, 0, 0],
                 [0, 0, 1, 0, 0, 0], [0.1, 0, 1, 0, 0, 0]])
    cal = calibrate_threshold(lfw_ids, lfw, far=1e-4, seed=0)
    diff = [(lfw[i] @ lfw[j]) for i in range(6) for j in range(6) if lfw_ids[i] != lfw_ids[j]]
    assert cal["different_pairs"] == 6 and cal["far_measurable"] == pytest.approx(1 / 6)
    assert max(diff) < cal["threshold"] < 0.2 and cal["same_people_caught"] == 1.0
    train = _unit([[0, 0.9, 0.1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    out = find_overlap(["0007", "0007", "0008"], train, lfw_ids, lfw, params=OverlapParams(), seed=0)
    assert (out["train_identities"], out["lfw_identities"], out["matches"]) == (2, 3, 1)
    assert out["matched"][0]["train_identity"] == "0007" and out["matched"][0]["lfw_identity"] == "B"


def _through_the_stages(source: DatasetParams, root) -> None:
    from pipeline.align.stage import run_align
    from pipeline.data.ingest import run_ingest
    from pipeline.mask.stage import run_mask

    compute = ComputeParams(n_jobs=2)
    run_ingest(params=IngestParams(), dataset=source, compute=compute, out_dir=root / "ingest")
    run_mask(params=MaskParams(), compute=compute, in_dir=root / "ingest", out_dir=root / "masked")
    run_align(params=AlignParams(), compute=compute, ingest_dir=root / "ingest", masked_dir=root / "masked",
              out_dir=root / "aligned")


@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
    """An LFW subset of 30 people (the evaluation side, whose people also calibrate the threshold)
    and an ImageFolder of numbered folders: 0000-0002 are three of those LFW people, 0003-0005 LFW
    people outside the subset; all through the real ingest, mask and align stages."""
    from pipeline.evaluate.evaluation import run_embed_reference
    from tests.conftest import make_lfw_subset

    root = tmp_path_factory.mktemp("hidden")
    subset = make_lfw_subset(root / "lfw", 20, 10)
    _through_the_stages(DatasetParams(path=str(subset)), root / "lfw_stages")
    run_embed_reference(params=EvaluateParams(device="cpu"), aligned_dir=root / "lfw_stages" / "aligned",
                        out_path=root / "reference" / "dlib.parquet", all_lfw=True)
    inside = sorted(p.name for p in (subset / "lfw-deepfunneled").iterdir() if len(list(p.iterdir())) >= 3)[:3]
    outside = [n for n in ("Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder")
               if not (subset / "lfw-deepfunneled" / n).exists()][:3]
    folder = root / "casia_like"
    for k, name in enumerate(inside + outside):
        (folder / f"{k:04d}").mkdir(parents=True)
        for n in (1, 2, 3):
            shutil.copy(lfw_root() / "lfw-deepfunneled" / name / f"{name}_{n:04d}.jpg", folder / f"{k:04d}" / f"{n}.jpg")
    _through_the_stages(DatasetParams(source="imagefolder", path=str(folder)), root)
    return root, inside


def test_numbered_folders_hiding_lfw_people_are_caught_and_dropped(hidden, tmp_path):
    root, inside = hidden
    out = run_overlap(params=OverlapParams(), external=True, train_aligned=root / "aligned",
                      reference_path=root / "reference" / "dlib.parquet", out_path=tmp_path / "overlap.json")
    assert json.loads((tmp_path / "overlap.json").read_text()) == out
    assert out["checked"] == 1 and out["train_identities"] == 6 and out["lfw_identities"] == 30
    assert {(m["train_identity"], m["lfw_identity"]) for m in out["matched"]} == {
        (f"{k:04d}", name) for k, name in enumerate(inside)}
    assert out["same_people_caught"] > 0.5
    params = PackParams(unseen_mask_types=[], val_fraction=0.0)
    idx = run_pack(params=params, aligned_dir=root / "aligned", out_dir=tmp_path / "shards", overlap=out)
    classes = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert sorted(classes) == ["0003", "0004", "0005"]
    assert idx["overlap_dropped"]["identities"] == ["0000", "0001", "0002"] and idx["overlap_dropped"]["images"] == 9
    with pytest.raises(PackError, match="3 training identities are LFW people by face"):
        run_pack(params=params, aligned_dir=root / "aligned", out_dir=tmp_path / "s2", overlap={**out, "action": "refuse"})
    kept = run_pack(params=params, aligned_dir=root / "aligned", out_dir=tmp_path / "s3", overlap={**out, "action": "keep"})
    assert kept["classes"] == 6 and kept["overlap_dropped"]["identities"] == []
    # LFW's own split: nothing compared, and said so
    none = run_overlap(params=OverlapParams(), external=False, train_aligned=root / "aligned",
                       reference_path=root / "reference" / "dlib.parquet", out_path=tmp_path / "o2.json")
    assert none["checked"] == 0 and "disjoint by name" in none["reason"]
