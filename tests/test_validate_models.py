"""scripts/validate_models.py: the train stage's validator on given models, one JSON line each."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import validate_models  # noqa: E402

from pipeline.models import build_embedding_net  # noqa: E402
from pipeline.training import read_shard_set  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_scores_dlib_and_a_checkpoint_on_the_same_val_pairs(tiny_shards, tmp_path, capsys):
    """dlib's network saved as a checkpoint scores exactly what `dlib` scores."""
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, read_shard_set(tiny_shards).template)
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, tmp_path / "model.pt")
    validate_models.main(["dlib", str(tmp_path / "model.pt"), "--shards", str(tiny_shards),
                          "--params", str(PARAMS)])
    dlib, saved = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert dlib["model"] == "dlib" and saved["model"].endswith("model.pt")
    keys = {"accuracy", "auc", "accuracy_raw", "rank1_raw", "rank1_masked"}
    assert keys <= set(dlib) and all(0.0 <= dlib[k] <= 1.0 for k in keys)
    assert {k: dlib[k] for k in keys} == {k: saved[k] for k in keys}


def test_a_name_that_is_neither_a_file_nor_a_revision_is_a_clear_error(tiny_shards):
    with pytest.raises(SystemExit, match="neither a model file nor a git revision"):
        validate_models.main(["no-such-rev-xyz", "--shards", str(tiny_shards), "--params", str(PARAMS)])


def test_alphas_score_the_model_moved_towards_dlib_on_val_and_test(lfw_small, tiny_shards, tmp_path, capsys):
    """--alphas scores start + alpha (model - start) (alpha times the model's own wise_alpha is the
    effective one) exactly as a checkpoint of those weights scores; --test adds the evaluate
    stage's LFW figures; --markdown a table per alpha."""
    from pipeline.models import interpolate_weights
    from tests.conftest import write_eval_pairs

    protocol = tmp_path / "protocol"
    shutil.copytree(tiny_shards.parent / "ingest" / "protocol", protocol)
    write_eval_pairs(lfw_small, protocol)
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, read_shard_set(tiny_shards).template)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    tuned = {k: v + 0.05 * v.std() * torch.randn_like(v) if "conv" in k else v for k, v in start.items()}
    torch.save({"model": tuned, "config": net.config, "meta": {"wise_alpha": 0.8}}, tmp_path / "tuned.pt")
    torch.save({"model": interpolate_weights(start, tuned, 0.5), "config": net.config, "meta": {}},
               tmp_path / "half.pt")
    common = ["--shards", str(tiny_shards), "--params", str(PARAMS), "--test", "--aligned",
              str(tiny_shards.parent / "aligned"), "--protocol", str(protocol)]
    validate_models.main(["dlib", str(tmp_path / "tuned.pt"), "--alphas", "1,0.5", "--markdown", *common])
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [(r["model"].split("/")[-1], r["wise_alpha"]) for r in rows] == [("dlib", 1.0), ("tuned.pt", 0.8),
                                                                            ("tuned.pt", 0.4)]
    validate_models.main([str(tmp_path / "half.pt"), *common])
    half = json.loads(capsys.readouterr().out)
    drop = ("model", "wise_alpha")
    assert {k: v for k, v in rows[2].items() if k not in drop} == {k: v for k, v in half.items() if k not in drop}
    assert rows[1]["test"] != rows[2]["test"] and rows[0]["test"] != rows[1]["test"]
    assert set(rows[0]["test"]) == {"rank1", "V1", "V2u"} and set(rows[0]["test"]["V1"]) == {"u-u", "m-u", "m-m"}
    assert set(rows[0]["test"]["rank1"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    table = [line for line in out if line.startswith("|")]
    assert table[0].startswith("| wise_alpha | models | val m-u |") and "V1 m-m" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 0.8", "| 0.4", "| dlib"]


def test_alphas_outside_the_unit_interval_are_refused(tiny_shards):
    with pytest.raises(SystemExit, match="--alphas: each must lie in"):
        validate_models.main(["dlib", "--alphas", "0,1", "--shards", str(tiny_shards), "--params", str(PARAMS)])


def test_val_pairs_do_not_follow_the_workspace_train_seed(tiny_shards):
    """params.yaml's train.seed is whatever experiment was applied last: the val pairs come from
    --val-seed (0, the default run's) instead, so figures stay comparable across calls."""
    from pipeline.config import TrainParams

    shards = read_shard_set(tiny_shards)
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, shards.template)
    drawn = {}
    for train_seed, val_seed in ((0, 0), (5, 0), (0, 5)):
        v = validate_models.make_validator(TrainParams(seed=train_seed), shards, torch.device("cpu"), val_seed)
        with torch.no_grad():
            v(net)
        drawn[train_seed, val_seed] = v.pairs
    same = [all(np.array_equal(drawn[k][f], drawn[0, 0][f]) for f in drawn[0, 0]) for k in drawn]
    assert same == [True, True, False]
