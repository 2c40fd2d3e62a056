"""Training loop on real tiny shards: every distill variant steps with finite losses, validation is
held out of training, checkpoints load, a killed run resumes to the same weights, DDP on 2 CPUs."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import DistillParams, TrainParams
from pipeline.models import load_embedding_model
from pipeline.pair_loader import make_pair_loader
from pipeline.tar_chunks import list_chunks
from pipeline.training import (build_pair_model, collect_val, drop_identities, from_uint8, fingerprint, lr_at, split_val_identities,
                               train, train_step, val_pairs)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch_size=4, embedding_dim=32, val_fraction=0.3, warmup_steps=2, num_workers=0,
            log_every=1, shuffle_buffer=8)


def test_val_identities_are_a_seeded_share_of_train_identities():
    classes = {f"person_{i:02d}": i for i in range(40)}
    a = split_val_identities(classes, 0.1, seed=3)
    assert a == split_val_identities(classes, 0.1, seed=3) and len(a) == 4
    assert a != split_val_identities(classes, 0.1, seed=4)
    assert split_val_identities(classes, 0.0, seed=3) == []
    with pytest.raises(ValueError, match="no training identities"):
        split_val_identities({"a": 0, "b": 1}, 0.5, seed=0)


def test_val_pairs_are_balanced_and_never_pair_an_image_with_itself():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = val_pairs(labels, seed=0, max_pairs=20)
    same = labels[p["gallery"]] == labels[p["probe"]]
    assert np.array_equal(same, p["same"]) and p["same"].sum() == (~p["same"]).sum() == 10
    assert not np.any(p["gallery"] == p["probe"])
    assert set(p["fold"]) <= set(range(10))
    again = val_pairs(labels, seed=0, max_pairs=20)
    assert all(np.array_equal(p[k], again[k]) for k in p)


def test_drop_identities_removes_validation_labels():
    batch = (torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2), torch.tensor([0, 5, 2, 5]))
    raw, masked, labels = drop_identities(batch, torch.tensor([5]))
    assert labels.tolist() == [0, 2] and raw.shape[0] == masked.shape[0] == 2


def test_collect_val_keeps_the_first_images_of_each_val_identity_and_counts_the_rest():
    labels = torch.tensor([3, 1, 3, 3, 0, 3, 1, 2])
    images = torch.linspace(-1, 1, 8)[:, None, None, None].expand(8, 3, 112, 112)
    batches = [(images[i:i + 3], -images[i:i + 3], labels[i:i + 3]) for i in range(0, 8, 3)]
    v = collect_val(batches, [1, 3], max_per_identity=2)
    assert v.labels.tolist() == [3, 1, 3, 1] and v.n_train == 2  # labels 0 and 2 train
    assert torch.allclose(from_uint8(v.raw[:, 0, 0, 0]), images[[0, 1, 2, 6], 0, 0, 0], atol=1 / 127.5)
    assert torch.allclose(from_uint8(v.masked), -from_uint8(v.raw), atol=2 / 127.5)


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    p = TrainParams(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, p) == pytest.approx(1e-4)
    assert lr_at(9, 100, p) == pytest.approx(1e-3)
    assert lr_at(55, 100, p) == pytest.approx(0.55e-3)  # half way through the cosine
    assert lr_at(100, 100, p) == pytest.approx(1e-4) and lr_at(500, 100, p) == pytest.approx(1e-4)


def test_fingerprint_changes_with_what_is_learned_not_with_workers():
    p = TrainParams()
    assert fingerprint(p, "d", 1) == fingerprint(p.model_copy(update={"num_workers": 7}), "d", 1)
    beta = p.model_copy(update={"distill": DistillParams(beta=2.0)})
    assert fingerprint(p, "d", 1) != fingerprint(beta, "d", 1)
    assert fingerprint(p, "d", 1) != fingerprint(p, "other shards", 1)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["none", "mse", "cosine", "margin_cosine"])
def test_every_distill_variant_trains_on_real_shards(tiny_shards, kind, dynamic):
    params = TrainParams(**TINY, distill=DistillParams(kind=kind, dynamic=dynamic, beta=1.0))
    classes = json.loads((tiny_shards / "classes.json").read_text())
    model, opt = build_pair_model(params, len(classes), torch.device("cpu"))
    before = model.net.head.fc.weight.detach().clone()
    loader = make_pair_loader(list_chunks(tiny_shards, "train-"), batch_size=4, augment=params.augment,
                              seed=0, shuffle_buffer=8)
    for batch in itertools.islice(loader, 1):
        out = train_step(model, opt, batch, lr=1e-3, grad_clip=5.0, device=torch.device("cpu"))
        assert torch.isfinite(out.total) and torch.isfinite(out.distill)
        assert out.total.item() == pytest.approx(out.ce_raw.item() + out.ce_masked.item() + out.distill.item(), rel=1e-4)
        both = (out.correct_raw & out.correct_masked).float().mean().item()
        if kind == "none":
            assert out.distill.item() == 0.0 and out.fraction.item() == 0.0
        elif dynamic:
            assert out.fraction.item() == pytest.approx(both)  # only pairs right on both sides
        else:
            assert out.fraction.item() == 1.0 and out.distill.item() > 0.0
    assert not torch.equal(before, model.net.head.fc.weight)


def test_train_holds_out_validation_and_writes_loadable_checkpoints(tiny_shards, tmp_path):
    params = TrainParams(**TINY, epochs=2)
    s = train(params=params, shards_dir=tiny_shards, out_dir=tmp_path / "models", live_dir=tmp_path / "live")
    index = json.loads((tiny_shards / "index.json").read_text())
    assert s["train_pairs"] + s["val_images"] == index["train"]["samples"]  # nothing lost, nothing shared
    assert s["val_identities"] == 2 and s["steps"] > 0 and not s["resumed"]
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2]  # the untrained point, then every epoch
    ckpt = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(ckpt) == {"model", "config", "meta"} and ckpt["config"]["image_size"] == 112
    assert ckpt["meta"]["val_accuracy"] == s["best_val_accuracy"] == max(h["accuracy"] for h in s["history"])
    assert all(tuple(v.shape) != (6, 32) for v in ckpt["model"].values())  # no ArcFace head inside
    net = load_embedding_model(tmp_path / "models" / "model.pt")
    assert net(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["accuracy"] <= 1.0 and metrics["best_val_accuracy"] == s["best_val_accuracy"]
    for name in ("loss", "ce_raw", "ce_masked", "distill", "distill_fraction", "acc_raw", "acc_masked", "lr",
                 "samples_per_s"):
        rows = (tmp_path / "live" / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == s["steps"] + 1, name  # header + one row per step (log_every=1)


def _write_params(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"train": {**TINY, **train}}))
    return path


def _stage(params: Path, out: Path, shards: Path, torchrun: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "stages.train"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "stages.train"]
    return cmd + ["--params", str(params), "--shards", str(shards), "--out", str(out / "models"),
                  "--live", str(out / "live")]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_killed_run_resumes_to_the_same_weights(tiny_shards, tmp_path):
    params = _write_params(tmp_path / "params.yaml", epochs=3, dropout=0.2)
    whole = tmp_path / "whole"
    subprocess.run(_stage(params, whole, tiny_shards), cwd=ROOT, env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_stage(params, killed, tiny_shards), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "models" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = _weights(last)["epoch"]
    assert 1 <= epoch_at_kill < 3, "the kill must land mid-training"

    done = subprocess.run(_stage(params, killed, tiny_shards), cwd=ROOT, env=_env(), check=True,
                          capture_output=True, text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["steps"] == _weights(whole / "models" / "last.pt")["step"]
    a, b = _weights(whole / "models" / "last.pt"), _weights(last)
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    # the dvclive curve has no duplicate steps from the killed run's tail
    steps = [r.split("\t")[0] for r in (killed / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert len(steps) == len(set(steps)) == summary["steps"]


def test_two_process_ddp_on_cpu(tiny_shards, tmp_path):
    params = _write_params(tmp_path / "params.yaml", epochs=1)
    out = tmp_path / "ddp"
    run = subprocess.run(_stage(params, out, tiny_shards, torchrun=2), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    summary = json.loads(lines[0])
    assert summary["world_size"] == 2 and summary["steps"] >= 1
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert ckpt["meta"]["world_size"] == 2
    assert load_embedding_model(out / "models" / "model.pt")(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
