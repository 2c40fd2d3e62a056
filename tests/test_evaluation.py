"""The evaluate stage end to end on the tiny real pipeline output (ingest -> mask -> align -> pack)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import ComputeParams, EvaluateParams
from pipeline.evaluation import (CONDITIONS, EvaluationError, load_embeddings, portion_key,
                                 run_embed_reference, run_evaluate, score_embeddings)
from pipeline.models import EmbeddingNet
from pipeline.protocols import IdentityOverlapError
from tests.conftest import write_eval_pairs

VERIFICATION_KEYS = {"accuracy", "auc", "tar_at_far_1e-2", "tar_at_far_1e-3", "eer"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lfw_small, tiny_shards):
    """The shared tiny real pipeline output (6 train + 4 test people), valid pair lists for its
    people, an untrained model in the checkpoint format and the cached dlib reference."""
    d = tmp_path_factory.mktemp("eval_inputs")
    root = tiny_shards.parent
    for name in ("aligned", "shards"):
        (d / name).symlink_to(root / name, target_is_directory=True)
    shutil.copytree(root / "ingest" / "protocol", d / "protocol")
    write_eval_pairs(lfw_small, d / "protocol")
    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", 32).eval()
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, d / "model.pt")
    params = EvaluateParams(device="cpu", batch_size=16)
    run_embed_reference(params=params, compute=ComputeParams(n_jobs=1), aligned_dir=d / "aligned",
                        out_path=d / "reference" / "dlib.parquet")
    return d


def _evaluate(d, out, params=None, shards=None):
    return run_evaluate(params=params or PARAMS, aligned_dir=d / "aligned", shards_dir=shards or d / "shards",
                        protocol_dir=d / "protocol", model_path=d / "model.pt",
                        out_dir=out, reference_path=d / "reference" / "dlib.parquet")


PARAMS = EvaluateParams(device="cpu", batch_size=16, paper_protocol=True)


@pytest.fixture(scope="module")
def evaluated(tiny):
    return _evaluate(tiny, tiny / "eval")


def _check_block(m: dict) -> None:
    for p in (0.0, 0.5, 1.0):
        for r in ("rank1", "rank5"):
            assert 0.0 <= m["gallery"][r][portion_key(p)] <= 1.0
    assert m["gallery"]["probes_masked"]["mask_0"] == 0
    assert m["gallery"]["probes_masked"]["mask_1.0"] == m["gallery"]["probes"]
    for cond in CONDITIONS:
        assert VERIFICATION_KEYS <= set(m["verification"][cond])
        assert all(0.0 <= m["verification"][cond][k] <= 1.0 for k in VERIFICATION_KEYS)


def test_every_metric_key_plot_and_picture_is_written(tiny, evaluated):
    metrics, out = evaluated, tiny / "eval"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics["gallery"]["rank1"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    _check_block(metrics)
    _check_block(metrics["reference"]["dlib"])
    # LFW's View 2 lists View 1 training people: skipped, and the metrics say why
    assert metrics["verification_view2"]["skipped"] == 1
    assert "training identities" in metrics["verification_view2"]["note"]
    # dlib is a strong face recogniser: on unmasked photos of 4 people it must do well
    ref = metrics["reference"]["dlib"]
    assert ref["gallery"]["rank1"]["mask_0"] >= 0.8
    assert ref["verification"]["unmasked_unmasked"]["auc"] >= 0.9
    for name in ("model", "dlib"):
        for cond in CONDITIONS:
            lines = (out / "plots" / "roc" / name / f"{cond}.csv").read_text().splitlines()
            assert lines[0] == "fpr,tpr" and lines[1] == "0,0" and lines[-1] == "1,1"
        cmc = (out / "plots" / "cmc" / name / "mask_0.5.csv").read_text().splitlines()
        assert cmc[0] == "rank,identification_rate" and cmc[-1].endswith(",1")
    for png in ("roc.png", "cmc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_protocol_is_labelled_and_leaks(evaluated):
    for m in (evaluated, evaluated["reference"]["dlib"]):
        paper = m["paper_protocol"]
        assert paper["not_comparable"] == 1 and "NOT COMPARABLE" in paper["note"]
        assert set(paper["rank1"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    # dlib on unmasked probes: every enrolled image finds itself, so the leaky number is higher
    ref = evaluated["reference"]["dlib"]
    assert ref["paper_protocol"]["rank1"]["mask_0"] > ref["gallery"]["rank1"]["mask_0"] - 1e-9


def test_same_inputs_give_identical_outputs(tiny, evaluated, tmp_path):
    _evaluate(tiny, tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == (tiny / "eval" / "metrics.json").read_bytes()
    csvs = sorted((tiny / "eval" / "plots").rglob("*.csv"))
    assert len(csvs) == 2 * (3 + 3)
    for f in csvs:
        assert f.read_bytes() == (tmp_path / f.relative_to(tiny / "eval")).read_bytes()


def test_identity_overlap_is_refused_unless_allowed(tiny, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny / "shards", shards, ignore=shutil.ignore_patterns("*.tar"))
    classes = json.loads((shards / "classes.json").read_text())
    classes["Abdullah_Gul"] = len(classes)  # a test identity among the training classes
    (shards / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(IdentityOverlapError, match="Abdullah_Gul"):
        _evaluate(tiny, tmp_path / "eval", shards=shards)
    assert not (tmp_path / "eval").exists()
    # allowed: it runs and says so; View 2 runs too (its pairs cover train people whose images are
    # not in the test set: those pairs are counted as missing)
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    m, _ = score_embeddings(ref, params=EvaluateParams(allow_identity_overlap=True),
                            protocol_dir=tiny / "protocol", train_identities=set(classes))
    assert m["identity_overlap_with_train"] == 1
    assert m["verification_view2"]["masked_masked"]["pairs_missing"] > 0


def test_reference_embeddings_must_match_the_settings(tiny, tmp_path):
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    assert ref.raw.shape[1] == 128 and len(ref.image_ids) == ref.masked.shape[0] > 20
    assert np.allclose(np.linalg.norm(ref.masked, axis=1), 1, atol=1e-4)
    with pytest.raises(EvaluationError, match="other settings"):
        _evaluate(tiny, tmp_path / "eval", params=EvaluateParams(device="cpu", flip=True))
    with pytest.raises(EvaluationError, match="missing"):
        run_evaluate(params=EvaluateParams(device="cpu"), aligned_dir=tiny / "aligned",
                     shards_dir=tiny / "shards", protocol_dir=tiny / "protocol",
                     model_path=tiny / "model.pt", out_dir=tmp_path / "e2", reference_path=tmp_path / "no.parquet")
