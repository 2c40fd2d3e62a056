"""Training loop on real tiny shards: every distill variant steps, validation identities never
train, checkpoints load, a killed run resumes to a byte-identical model, a code change never
resumes, DDP on 2 CPU processes reads disjoint shards and stops together (end of data, non-finite
loss), too few shards fail before training."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pipeline.config import DistillParams, TrainParams
from pipeline.recognition.models import load_embedding_model
from pipeline.train.pair_loader import make_pair_loader
from pipeline.data.tar_chunks import list_chunks, read_chunk
from pipeline.pack.shards import read_shard_set
from pipeline.train.checkpoint import code_fingerprint, fingerprint
from pipeline.train.loop import lr_at, train
from pipeline.train.pair_model import build_pair_model, train_step

ROOT = Path(__file__).resolve().parents[1]
# the from-scratch recipe (ResNet18, ArcFace + the report's twin distillation), at toy size
SCRATCH = dict(backbone="resnet18", pretrained="none", wise_alpha=1.0, arcface={"weight": 1.0},
               distill={"teacher": "self", "dynamic": True}, lr=2e-4, weight_decay=5e-4)
TINY = dict(SCRATCH, batch_size=4, embedding_dim=32, warmup_steps=2, num_workers=0, log_every=1, shuffle_buffer=8)


def _keys(shards: list[Path]) -> list[str]:
    return [k for s in shards for k, _ in read_chunk(s)]


def _identity(key: str) -> str:
    return key.split("/")[0]


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    p = TrainParams(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, p) == pytest.approx(1e-4)
    assert lr_at(9, 100, p) == pytest.approx(1e-3)
    assert lr_at(55, 100, p) == pytest.approx(0.55e-3)  # half way through the cosine
    assert lr_at(100, 100, p) == pytest.approx(1e-4) and lr_at(500, 100, p) == pytest.approx(1e-4)


def test_fingerprint_covers_params_data_world_and_code_not_workers(tmp_path):
    p = TrainParams()
    fp = fingerprint(p, "d", 1, "code")
    assert fp == fingerprint(p.model_copy(update={"num_workers": 7}), "d", 1, "code")
    assert fp != fingerprint(p.model_copy(update={"distill": DistillParams(beta=2.0)}), "d", 1, "code")
    assert fp != fingerprint(p, "other shards", 1, "code")
    assert fp != fingerprint(p, "d", 2, "code")
    assert fp != fingerprint(p, "d", 1, "other code")
    # the code part: any byte of any .py in pipeline/ or stages/
    for d in ("pipeline", "stages"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    base = code_fingerprint(tmp_path)
    assert base == code_fingerprint(ROOT)
    losses = tmp_path / "pipeline" / "train" / "losses.py"
    losses.write_text(losses.read_text().replace("std=0.01", "std=0.02"))
    assert code_fingerprint(tmp_path) != base


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["none", "mse", "cosine", "margin_cosine"])
def test_every_distill_variant_trains_on_real_shards(tiny_shards, kind, dynamic):
    params = TrainParams(**{**TINY, "distill": DistillParams(kind=kind, dynamic=dynamic, beta=1.0, teacher="self")})
    classes = json.loads((tiny_shards / "classes.json").read_text())
    model, opt = build_pair_model(params, len(classes), torch.device("cpu"), read_shard_set(tiny_shards).template)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = make_pair_loader(list_chunks(tiny_shards, "train-"), batch_size=4, augment=params.augment,
                              seed=0, shuffle_buffer=8)
    batch = next(iter(loader))
    out = train_step(model, opt, batch, lr=1e-3, grad_clip=5.0, device=torch.device("cpu"))
    assert torch.isfinite(out.total) and torch.isfinite(out.distill)
    both = (out.correct_raw & out.correct_masked).float().mean().item()
    if kind == "none":
        assert out.distill.item() == 0.0 and out.fraction.item() == 0.0
    elif dynamic:
        assert out.fraction.item() == pytest.approx(both)  # only pairs right on both sides
    else:
        assert out.fraction.item() == 1.0 and out.distill.item() > 0.0
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("net.") for k in changed) and "head.weight" in changed


def test_validation_identities_never_train_and_the_model_is_written(tiny_shards, tmp_path):
    index = json.loads((tiny_shards / "index.json").read_text())
    val_ids = set(index["val"]["identities"])
    train_keys = _keys(list_chunks(tiny_shards, "train-"))
    val_keys = _keys(list_chunks(tiny_shards, "val-"))
    # the held-out split is part of the packed data set: disjoint identities, every pair once
    assert len(val_ids) == 2 and {_identity(k) for k in val_keys} == val_ids
    assert not {_identity(k) for k in train_keys} & val_ids
    assert len(train_keys) == len(set(train_keys)) == index["train"]["samples"]
    classes = json.loads((tiny_shards / "classes.json").read_text())
    assert set(classes) == {_identity(k) for k in train_keys}  # no ArcFace class for a val identity

    params = TrainParams(**TINY, epochs=2)
    s = train(params=params, shards_dir=tiny_shards, out_dir=tmp_path / "models", live_dir=tmp_path / "live",
              resume_dir=tmp_path / "resume")
    assert s["train_pairs"] == index["train"]["samples"] and s["val_identities"] == 2
    # one loader, drop_last: each epoch trains on the full batches of 4 of every train pair
    assert s["steps"] == 2 * (index["train"]["samples"] // 4) > 0 and not s["resumed"]
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2]  # the untrained point, then every epoch
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]  # nothing else in the output
    assert not (tmp_path / "resume").exists()  # a finished run leaves no resume state
    ckpt = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(ckpt) == {"model", "config", "meta"} and ckpt["config"]["image_size"] == 150
    assert ckpt["config"]["template"] == index["template"] == "dlib150"
    assert ckpt["meta"]["val_accuracy"] == s["best_val_accuracy"] == max(h["accuracy"] for h in s["history"])
    # wise_alpha 1: the best point as it is, validated once more as written
    assert ckpt["meta"]["wise_alpha"] == 1.0 and ckpt["meta"]["model_val"]["accuracy"] == s["best_val_accuracy"]
    assert all(v.shape[0] != len(classes) for v in ckpt["model"].values() if v.ndim == 2)  # no ArcFace head
    net = load_embedding_model(tmp_path / "models" / "model.pt")
    assert net(torch.zeros(2, 3, 150, 150)).shape == (2, 32)
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["accuracy"] <= 1.0 and metrics["best_val_accuracy"] == s["best_val_accuracy"]
    assert metrics["model_val"] == ckpt["meta"]["model_val"]
    assert 0.0 <= metrics["val"]["rank1_mask_1.0"] <= 1.0 and 0.0 <= metrics["val"]["rank1_mask_0"] <= 1.0
    curves = tmp_path / "live" / "plots" / "metrics" / "train"
    for name in ("loss", "ce_raw", "ce_masked", "distill", "distill_fraction", "acc_raw", "acc_masked", "lr"):
        rows = (curves / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == s["steps"] + 1, name  # header + one row per step (log_every=1)
    # no timing in a cached output (it changed dvc.lock on every rerun): speed is in the summary only
    assert {p.stem for p in curves.glob("*.tsv")} == {"loss", "ce_raw", "ce_masked", "distill", "distill_fraction",
                                                     "acc_raw", "acc_masked", "lr"}
    assert "per_s" not in json.dumps(metrics) and s["pairs_per_s"] > 0


def test_too_few_shards_fail_before_training(tiny_shards, tmp_path):
    n = len(list_chunks(tiny_shards, "train-"))
    params = TrainParams(**{**TINY, "num_workers": n + 1})
    with pytest.raises(ValueError, match=rf"{n} train shard\(s\) for 1 rank\(s\) x {n + 1} loader worker\(s\).*"
                                         r"pack.shard_max_count"):
        train(params=params, shards_dir=tiny_shards, out_dir=tmp_path / "m", live_dir=tmp_path / "l",
              resume_dir=tmp_path / "r")
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()


def test_detected_geometry_needs_twins_aligned_on_their_own(tiny_shards, tmp_path):
    """masked_geometry: detected on shards packed without masked_standalone.jpg: a clear error
    naming the align param, before any training."""
    params = TrainParams(**{**TINY, "augment": {"masked_geometry": "detected"}})
    with pytest.raises(ValueError, match=r"align.standalone_twin_splits: \[train\]"):
        train(params=params, shards_dir=tiny_shards, out_dir=tmp_path / "m", live_dir=tmp_path / "l",
              resume_dir=tmp_path / "r")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- resume (stage runs)
def _write_params(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"train": {**TINY, **train}}))
    return path


def _stage(params: Path, out: Path, shards: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--params", str(params), "--shards", str(shards),
            "--out", str(out / "models"), "--live", str(out / "live"), "--resume-dir", str(out / "resume")]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_killed_run_resumes_to_a_byte_identical_model(tiny_shards, tmp_path):
    params = _write_params(tmp_path / "params.yaml", epochs=2, dropout=0.2, val_every=0)
    whole = tmp_path / "whole"
    subprocess.run(_stage(params, whole, tiny_shards), cwd=ROOT, env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_stage(params, killed, tiny_shards), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "resume" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch: the kill lands mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(last, weights_only=True)["epoch"]
    assert epoch_at_kill == 1, "the kill must land in the second of the two epochs"
    assert not (killed / "models").exists()  # nothing half-done in the DVC output

    done = subprocess.run(_stage(params, killed, tiny_shards), cwd=ROOT, env=_env(), check=True,
                          capture_output=True, text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and "resuming" in done.stdout
    # the whole output is byte-identical to the uninterrupted run's: the same DVC hash
    assert sorted(p.name for p in (killed / "models").iterdir()) == ["model.pt"]
    assert (killed / "models" / "model.pt").read_bytes() == (whole / "models" / "model.pt").read_bytes()
    assert not (killed / "resume").exists()
    # the dvclive curve has no duplicate steps from the killed run's tail
    steps = [r.split("\t")[0] for r in (killed / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert len(steps) == len(set(steps)) == summary["steps"]


def test_resume_state_of_other_code_is_ignored(tiny_shards, tmp_path, monkeypatch):
    """A resume state from other code (same params and data) trains from scratch."""
    import pipeline.train.loop as loop

    params = TrainParams(**TINY, epochs=1, val_every=0)
    kw = dict(params=params, shards_dir=tiny_shards, live_dir=tmp_path / "live", resume_dir=tmp_path / "r")
    monkeypatch.setattr(loop, "code_fingerprint", lambda root=None: "old code")
    monkeypatch.setattr(loop, "discard_resume_state", lambda d, **kw: None)
    first = train(out_dir=tmp_path / "a", **kw)
    assert (tmp_path / "r" / "last.pt").is_file()  # as if the run had been killed after its last epoch
    monkeypatch.undo()
    monkeypatch.setattr(loop, "code_fingerprint", lambda root=None: "new code")
    second = train(out_dir=tmp_path / "b", **kw)
    assert not second["resumed"] and second["steps"] == first["steps"] > 0


# ----------------------------------------------------------------------------- DDP (2 CPU processes)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingLoader:
    """make_pair_loader that records the keys each rank trains on, and (``poison_rank``) feeds
    NaN images to one rank from its second batch on."""

    def __init__(self, out: Path, poison_rank: int = -1):
        self.out, self.poison_rank = out, poison_rank

    def __call__(self, *args, **kwargs):
        rank = int(os.environ["RANK"])
        loader = make_pair_loader(*args, return_keys=True, **kwargs)
        for i, (raw, masked, label, keys) in enumerate(loader):
            with open(self.out / f"keys-{rank}-{kwargs.get('epoch', 0)}.txt", "a") as fh:
                fh.write("".join(k + "\n" for k in keys))
            if rank == self.poison_rank and i >= 1:
                raw = torch.full_like(raw, float("nan"))
            yield raw, masked, label


def _ddp_worker(rank: int, world: int, port: int, shards: str, out: str, params: dict, poison_rank: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    out_dir = Path(out)
    result: dict = {}
    try:
        s = train(params=TrainParams(**params), shards_dir=shards, out_dir=out_dir / "models",
                  live_dir=out_dir / "live", resume_dir=out_dir / "resume",
                  make_loader=RecordingLoader(out_dir, poison_rank))
        result = {"steps": s["steps"], "world_size": s["world_size"], "weights": s["weights_sha256"]}
    except Exception as err:  # reported to the test, which asserts on it
        result = {"error": type(err).__name__, "message": str(err)}
    (out_dir / f"result-{rank}.json").write_text(json.dumps(result))


def _run_ddp(tiny_shards: Path, out: Path, poison_rank: int = -1, **train) -> list[dict]:
    out.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tiny_shards), str(out), {**TINY, **train},
                                                     poison_rank)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung (waiting in a collective for a rank that stopped)"
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]


def test_two_process_ddp_reads_disjoint_shards_and_ends_with_equal_weights(tiny_shards, tmp_path):
    res = _run_ddp(tiny_shards, tmp_path / "ddp", epochs=1, val_every=0)
    assert all("error" not in r for r in res), res
    assert res[0]["world_size"] == 2 and res[0]["steps"] == res[1]["steps"] >= 1
    assert res[0]["weights"] == res[1]["weights"]  # gradients all-reduced: one model on both ranks
    seen = [(tmp_path / "ddp" / f"keys-{r}-0.txt").read_text().split() for r in range(2)]
    everything = _keys(list_chunks(tiny_shards, "train-"))
    # disjoint shards: no sample on both ranks; one pass: no sample twice on a rank
    assert not set(seen[0]) & set(seen[1]) and all(len(s) == len(set(s)) for s in seen)
    # each shard belongs to one rank (what the ranks read until they stop together)
    owner = {k: sh.name for sh in list_chunks(tiny_shards, "train-") for k, _ in read_chunk(sh)}
    assert set(seen[0]) | set(seen[1]) <= set(everything)
    assert not {owner[k] for k in seen[0]} & {owner[k] for k in seen[1]}
    assert len(seen[0]) + len(seen[1]) >= 2 * res[0]["steps"] * 2  # every step: 2 pairs per rank
    ckpt = torch.load(tmp_path / "ddp" / "models" / "model.pt", weights_only=True)
    assert ckpt["meta"]["world_size"] == 2


def test_non_finite_loss_on_one_rank_stops_every_rank(tiny_shards, tmp_path):
    # rank 1's loss turns non-finite at a log step while rank 0's is still finite (its NaN arrives
    # only with the next gradient all-reduce): a rank-local check would stop rank 1 alone
    res = _run_ddp(tiny_shards, tmp_path / "nan", poison_rank=1, epochs=1, val_every=0, log_every=1)
    assert [r.get("error") for r in res] == ["FloatingPointError", "FloatingPointError"], res
    assert "non-finite loss" in res[0]["message"]


FINE_TUNE = dict(backbone="dlib_resnet", pretrained="dlib", embedding_dim=None, batch_size=4, warmup_steps=0,
                 num_workers=0, log_every=1, shuffle_buffer=8, backbone_lr_ratio=0.5, freeze_affine=True,
                 arcface={"weight": 0.0},
                 distill={"kind": "cosine", "teacher": "frozen", "dynamic": False, "beta": 1.0, "raw_weight": 2.0})


def test_arcface_centres_start_at_the_class_means_of_a_pretrained_net(tiny_shards):
    """Weight imprinting: each centre is its class's mean unit embedding (raw twins, no
    augmentation) under dlib's network, so the first ArcFace loss is far below a random head's."""
    import torch.nn.functional as F

    from pipeline.train.loop import Dist, centre_init, imprint_class_centres

    params = TrainParams(**{**FINE_TUNE, "arcface": {"weight": 1.0}, "distill": {"kind": "none", "teacher": "self"}})
    assert centre_init(params) == "class_means" and centre_init(TrainParams(**TINY)) == "random"
    shards = read_shard_set(tiny_shards)
    model, _ = build_pair_model(params, len(shards.classes), torch.device("cpu"), shards.template)
    random_centres = model.head.weight.detach().clone()
    n = imprint_class_centres(model, shards.train, batch_size=8, device=torch.device("cpu"), rank=Dist())
    assert n == len(shards.classes)  # every class has train pairs
    raw, _, labels = next(iter(make_pair_loader(shards.train, batch_size=64, augment=None, seed=0, drop_last=False)))
    with torch.no_grad():
        emb = F.normalize(model.net.eval()(raw))
        c = int(labels[0])
        assert torch.allclose(model.head.weight[c], F.normalize(emb[labels == c].mean(0), dim=0), atol=1e-5)
        ce = F.cross_entropy(model.head(emb, labels)[0], labels)
        model.head.weight.copy_(random_centres)
        assert ce < 0.5 * F.cross_entropy(model.head(emb, labels)[0], labels)


def test_frozen_teacher_fine_tuning_trains_the_student_only(tiny_shards):
    """dlib's network fine-tuned towards a frozen copy of itself: at the first step student ==
    teacher, so the loss is exactly mean(1 - cos(teacher(masked), teacher(raw))); the teacher and the
    folded BatchNorms stay, the convolutions move at lr * backbone_lr_ratio."""
    from pipeline.recognition.dlib_resnet import Affine

    params = TrainParams(**FINE_TUNE)
    classes = json.loads((tiny_shards / "classes.json").read_text())
    model, opt = build_pair_model(params, len(classes), torch.device("cpu"), read_shard_set(tiny_shards).template)
    assert [g["lr_ratio"] for g in opt.param_groups] == [1.0, 0.5]
    assert not any(p.requires_grad for m in model.net.modules() if isinstance(m, Affine) for p in m.parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = next(iter(make_pair_loader(list_chunks(tiny_shards, "train-"), batch_size=4,
                                       augment=params.augment, seed=0, shuffle_buffer=8)))
    with torch.no_grad():
        t_raw, t_masked = model.teacher(batch[0]), model.teacher(batch[1])
    expected = (1 - torch.nn.functional.cosine_similarity(t_raw, t_masked)).mean()
    out = train_step(model, opt, batch, lr=1e-3, grad_clip=5.0, device=torch.device("cpu"))
    assert out.distill.item() == pytest.approx(expected.item(), rel=1e-4) and expected.item() > 0.01
    assert out.total.item() == pytest.approx(out.distill.item(), rel=1e-6)  # arcface.weight 0
    assert out.fraction.item() == 1.0
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("teacher."))
    assert all(torch.equal(after[k], before[k]) for k in before if ".aff" in k and k.startswith("net."))
    assert not torch.equal(after["net.net.conv1.weight"], before["net.net.conv1.weight"])
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-3)
    model.train()
    assert model.net.training and not model.teacher.training


def test_fine_tuning_params_are_checked_against_the_backbone():
    from pipeline.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match="train.pretrained='dlib' does not fit train.backbone='resnet18'"):
        parse_params({"train": {"backbone": "resnet18", "pretrained": "dlib"}})
    with pytest.raises(ParamsError, match="dynamic needs the classifier"):
        parse_params({"train": {"arcface": {"weight": 0}, "distill": {"dynamic": True}}})
    with pytest.raises(ParamsError, match="128"):
        parse_params({"train": {"backbone": "dlib_resnet", "embedding_dim": 512}})
    for start in ("none", "imagenet"):  # WiSE-FT needs a face model to move back towards
        with pytest.raises(ParamsError, match=f"train.wise_alpha=0.8 .*pretrained {start} is no face model; allowed there: 1"):
            parse_params({"train": {"backbone": "resnet18", "pretrained": start, "distill": {"teacher": "self"}}})
        assert parse_params({"train": {"backbone": "resnet18", "pretrained": start, "distill": {"teacher": "self"},
                                        "wise_alpha": 1}}).train.wise_alpha == 1


def test_the_written_model_is_the_best_point_moved_towards_the_start(tiny_shards, tmp_path):
    """WiSE-FT: with wise_alpha the written weights are start + alpha (best - start), the start
    being dlib's network before any step, and its validation figures (meta, dvclive summary) are
    those of exactly the written weights. (Driven through the Trainer: which point wins validation
    on 2 held-out people is not this test's business, so the trained net is made the best point.)"""
    from dvclive import Live

    from pipeline.recognition.models import build_embedding_net
    from pipeline.evaluate.validation import Validator
    from pipeline.train.checkpoint import model_checkpoint, save_atomic
    from pipeline.train.loop import setup

    params = TrainParams(**dict(FINE_TUNE, arcface={"weight": 1.0}), epochs=1, val_every=0, device="cpu",
                         wise_alpha=0.5)
    tr = setup(params, tiny_shards, tmp_path / "resume", make_pair_loader)
    tr.live = Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None)
    tr.model.train()
    tr.run_epoch(0)
    tuned = {k: v.detach().clone() for k, v in tr.model.net.state_dict().items()}
    tr.state.best_point = model_checkpoint(tr.model.net, {"val_accuracy": 0.0})
    ckpt = tr.final_checkpoint()
    start = build_embedding_net("dlib_resnet", pretrained="dlib", template="dlib150").state_dict()
    moved = [k for k in tuned if not torch.equal(tuned[k], start[k])]
    assert moved and all(".aff" not in k for k in moved)  # fine-tuning moved the convolutions only
    for k in tuned:
        assert torch.allclose(ckpt["model"][k], (start[k] + tuned[k]) / 2, atol=1e-6), k
    assert ckpt["meta"]["wise_alpha"] == 0.5
    path = tmp_path / "model.pt"
    save_atomic(ckpt, path)
    with torch.no_grad():
        fresh = Validator(tr.shards.val, tr.shards.template, torch.device("cpu"), 64)(load_embedding_model(path))
    assert ckpt["meta"]["model_val"] == pytest.approx(fresh)
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["model_val"] == pytest.approx(fresh)


# ----------------------------------------------------------------------------- the resume folder
def test_a_resume_folder_that_holds_what_dvc_tracks_is_refused(tiny_shards, tmp_path):
    """`--resume-dir models` once deleted the model it had just written, `--resume-dir .` the checkout."""
    kw = dict(params=TrainParams(**TINY, epochs=1), shards_dir=tiny_shards, out_dir=tmp_path / "models",
              live_dir=tmp_path / "live")
    for bad, match in ((tmp_path / "models", "overlaps"), (tmp_path, "overlaps"), (tiny_shards, "overlaps"),
                       (ROOT, "the project root"), (ROOT.parent, "the project root"),
                       (ROOT / "models", "overlaps"), (ROOT / "data" / "shards" / "x", "overlaps"),
                       (ROOT / "data", "overlaps")):
        with pytest.raises(ValueError, match=f"--resume-dir .*{match}"):
            train(resume_dir=bad, **kw)
    assert not (tmp_path / "models").exists() and not (tmp_path / "live").exists()


def test_the_trainer_deletes_only_its_own_files(tiny_shards, tmp_path):
    resume = tmp_path / "mine"
    resume.mkdir()
    (resume / "notes.txt").write_text("a user's file")
    train(params=TrainParams(**TINY, epochs=1), shards_dir=tiny_shards, out_dir=tmp_path / "m",
          live_dir=tmp_path / "l", resume_dir=resume)
    assert (tmp_path / "m" / "model.pt").is_file()
    assert sorted(p.name for p in resume.iterdir()) == ["notes.txt"]  # the folder it did not make stays


def test_a_kill_at_the_resume_write_resumes_to_the_same_model(tiny_shards, tmp_path, monkeypatch):
    """The best point travels inside last.pt (one atomic write per epoch): a kill after the new file
    is written but before it replaces the old one resumes from the epoch before, to the same model."""
    import pipeline.train.checkpoint as checkpoint

    params = TrainParams(**TINY, epochs=2)
    kw = dict(params=params, shards_dir=tiny_shards)
    train(out_dir=tmp_path / "a", live_dir=tmp_path / "la", resume_dir=tmp_path / "ra", **kw)
    real = checkpoint.save_atomic

    def killed_before_the_rename(obj, path):
        if path.name == "last.pt" and obj["epoch"] == 2:
            torch.save(obj, path.with_name("last.pt.tmp"))
            raise KeyboardInterrupt("killed")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "b", live_dir=tmp_path / "lb", resume_dir=tmp_path / "rb", **kw)
    monkeypatch.undo()
    assert torch.load(tmp_path / "rb" / "last.pt", weights_only=True)["epoch"] == 1
    assert not list((tmp_path / "rb").glob("best*")) and not (tmp_path / "b").exists()
    s = train(out_dir=tmp_path / "b", live_dir=tmp_path / "lb", resume_dir=tmp_path / "rb", **kw)
    assert s["resumed"] and not (tmp_path / "rb").exists()
    assert (tmp_path / "b" / "model.pt").read_bytes() == (tmp_path / "a" / "model.pt").read_bytes()
