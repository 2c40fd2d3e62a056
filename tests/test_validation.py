"""pipeline.evaluate.validation on real shards: the held-out train people scored as evaluate scores test."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import EvaluateParams, ValidateParams
from pipeline.evaluate.evaluation import embed_chunks, pair_scores
from pipeline.metrics import kfold_accuracy
from pipeline.recognition.models import build_embedding_net
from pipeline.data.protocols import build_validation_pairs
from pipeline.data.tar_chunks import list_chunks
from pipeline.pack.shards import read_shard_set
from pipeline.config import MASK_TYPES
from pipeline.data.tar_chunks import file_sha256
from pipeline.evaluate.validation import (Validator, embed_validation, resolution, run_validate, score_validation,
                                          training_figures)

EVAL = EvaluateParams(device="cpu", bootstrap_replicates=200)
VAL = ValidateParams(pairs_per_identity=4)


@pytest.fixture(scope="module")
def dlib_val(tiny_shards):
    return embed_validation("dlib", tiny_shards, params=EVAL)


def test_val_crops_embed_as_the_same_crops_in_the_aligned_train_chunks(tiny_shards, dlib_val):
    """A validation figure and a test figure of the same people agree: the val shards carry the
    aligned crops' bytes and go through evaluate's embedder path, so each held-out image's vectors
    are those of its aligned train chunk."""
    chunks = list_chunks(tiny_shards.parent / "aligned" / "chunks", prefix="train-")
    everyone = embed_chunks("dlib", chunks, template=read_shard_set(tiny_shards).template, flip=False, batch_size=64)
    held_out = set(json.loads((tiny_shards / "index.json").read_text())["val"]["identities"])
    assert set(dlib_val.identities) == held_out and len(held_out) >= 2
    idx = everyone.index()
    rows = [idx[i] for i in dlib_val.image_ids]
    # equal up to float rounding (other batches, other BLAS blocking)
    assert np.allclose(everyone.raw[rows], dlib_val.raw, atol=1e-5)
    assert np.allclose(everyone.masked[rows], dlib_val.masked, atol=1e-5)


def test_validation_accuracy_is_the_kfold_accuracy_of_its_pairs(dlib_val):
    m, extra = score_validation(dlib_val, evaluate=EVAL, validate=VAL, intervals=False)
    pairs = build_validation_pairs(dlib_val.image_ids, dlib_val.identities, per_identity=4, n_folds=EVAL.n_folds,
                                   seed=EVAL.seed)
    assert m["pairs"] == len(pairs) and m["identities"] == len(set(dlib_val.identities))
    raw = {k: v for k, v in zip(dlib_val.image_ids, dlib_val.raw)}
    masked = {k: v for k, v in zip(dlib_val.image_ids, dlib_val.masked)}
    by_hand = np.array([float(raw[a] @ masked[b]) for a, b in zip(pairs.a, pairs.b)])  # probe side masked
    assert np.allclose(by_hand, pair_scores(dlib_val, pairs)[0]["masked_unmasked"])
    assert m["verification"]["masked_unmasked"]["accuracy"] == kfold_accuracy(by_hand, pairs.same, pairs.fold).accuracy
    assert "accuracy_ci" not in m["verification"]["masked_unmasked"] and not extra["replicates"]
    figs = training_figures(m)
    assert set(figs) == {"accuracy", "accuracy_raw", "accuracy_masked", "auc", "rank1_mask_0", "rank1_mask_0.5",
                         "rank1_mask_1.0"}
    assert figs["rank1_mask_0"] == m["gallery"]["rank1"]["mask_0"]


def test_validation_figures_carry_bootstrap_intervals(tiny_shards):
    """Every person of the tiny pipeline (10, train and test chunks) as a validation set: the
    figures come with their interval and replicates (2 held-out people are too few to resample)."""
    chunks = sorted((tiny_shards.parent / "aligned" / "chunks").glob("*.tar"))
    emb = embed_chunks("dlib", chunks, template=read_shard_set(tiny_shards).template, flip=False, batch_size=64)
    assert len(set(emb.identities)) == 10
    with_ci, extra = score_validation(emb, evaluate=EVAL, validate=VAL)
    ci = with_ci["verification"]["masked_unmasked"]["accuracy_ci"]
    assert ci["low"] <= with_ci["verification"]["masked_unmasked"]["accuracy"] <= ci["high"]
    assert ("verification", "masked_unmasked", "accuracy") in extra["replicates"]
    assert with_ci["gallery"]["rank1_ci"]["mask_1.0"] is not None  # (30 strangers reach no FPIR: no DIR)


def test_the_train_stage_validates_with_the_validate_stage_figures(tiny_shards, dlib_val):
    """The Validator that picks the checkpoint reports exactly what the validate stage computes (no
    intervals), whatever precision or mode the training net was in."""
    shards = read_shard_set(tiny_shards)
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, shards.template).train()
    v = Validator(shards.val, shards.template, torch.device("cpu"), 64, EVAL, VAL)
    got = v(net)
    assert net.training  # the training net's mode comes back
    m, _ = score_validation(dlib_val, evaluate=EVAL, validate=VAL, intervals=False)
    assert got == pytest.approx(training_figures(m), abs=1e-6)


def test_run_validate_writes_figures_paired_differences_and_the_size_it_takes(tiny_shards, tmp_path):
    """dlib's network saved as the model: every paired difference to the dlib reference is 0, within
    noise (the size it takes: test_resolution_by_hand)."""
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, read_shard_set(tiny_shards).template)
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, tmp_path / "model.pt")
    m = run_validate(evaluate=EVAL, validate=VAL, shards_dir=tiny_shards, model_path=tmp_path / "model.pt",
                     out_dir=tmp_path / "validation", masked_dir=tiny_shards.parent / "masked")
    assert json.loads((tmp_path / "validation" / "metrics.json").read_text()) == m
    assert m["verification"] == m["reference"]["dlib"]["verification"]
    # by_mask on the validation pairs: every pair in one type group, the same for model and dlib
    b = m["by_mask"]["verification_masked_unmasked"]
    assert sum(b["count"][f"type_{t}"] for t in MASK_TYPES) == m["pairs"] == b["count"]["seen"] + b["count"]["unseen"]
    assert m["by_mask"] == m["reference"]["dlib"]["by_mask"]
    # identify's 1:N thresholds from the same people, keyed as identify looks them up
    t = json.loads((tmp_path / "validation" / "thresholds.json").read_text())
    assert t["model"]["model_sha256"] == file_sha256(tmp_path / "model.pt") and t["dlib"]["model_sha256"] == "dlib"
    assert t["model"]["one_to_n"] == t["dlib"]["one_to_n"]  # the same network
    assert t["model"]["one_to_n"]["people"] == 2 and t["model"]["template"] == "dlib150"
    d = m["vs_dlib"]["gallery"]["rank1"]["mask_1.0"]
    assert d == {"diff": 0.0, "low": 0.0, "high": 0.0, "verdict": 0}
    # 2 held-out people: too few to resample verification (no interval, so no size from it)
    assert m["verification"]["masked_unmasked"]["accuracy_ci"] is None
    assert m["resolution"]["identities"] == 2 and "figure" not in m["resolution"]
    assert len(read_shard_set(tiny_shards).val) >= 1


def test_resolution_by_hand():
    metrics = {"pairs": 1800, "verification": {"masked_unmasked": {"bootstrap_identities": 300,
                                                                   "accuracy_ci": {"low": 0.90, "high": 0.94}}}}
    vs = {"verification": {"masked_unmasked": {"accuracy": {"diff": 0.05, "low": 0.04, "high": 0.06, "verdict": 1}}}}
    r = resolution(metrics, vs)
    assert r["figure"]["identities_needed"] == 1200  # 300 x (0.02 / 0.01)^2
    assert r["paired_vs_dlib"]["identities_needed"] == 300  # half-width 0.01: these 300 suffice
    assert r["identities"] == 300 and r["pairs"] == 1800 and "paired_vs_dlib" not in resolution(metrics, None)
