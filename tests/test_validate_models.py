"""scripts/validate_models.py: the train stage's validator on given models, one JSON line each."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
