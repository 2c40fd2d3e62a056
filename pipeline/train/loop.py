"""The training loop: pairs of (raw, masked) faces -> embedding net + ArcFace + distillation.

One readable loop in the spirit of nanoGPT's train.py, top to bottom: ranks, the schedule, one
epoch (:meth:`Trainer.run_epoch`), setup, then :func:`train`. What it guarantees:

- Model selection never sees the test set: pack holds out a seeded share of the TRAIN identities
  (``val-*.tar``, never in a training step); verification pairs among them, probe side masked, give
  ``val/accuracy`` (:class:`pipeline.evaluate.validation.Validator`); the best point by it, moved
  back towards the pretrained start by ``wise_alpha`` (WiSE-FT), becomes ``models/model.pt``,
  validated once more as it is written.
- Resume without stale results (:mod:`pipeline.train.checkpoint`): the resume state lives outside
  the DVC output, is written atomically after every epoch and resumed only by the same params,
  data, world size and code. Data order and dropout are seeded by (seed, epoch): a killed and
  resumed run writes a model.pt byte-identical to an uninterrupted one, and ``models/`` holds only
  that file.
- DDP under torchrun (nccl on CUDA, gloo on CPU): shards are split across ranks by the pair loader
  (every rank x worker needs a shard: checked before training), ranks stop together at the
  shortest rank's end and together on a non-finite loss; only rank 0 logs and writes.
- bf16 autocast on CUDA, channels_last on CUDA and CPU (:mod:`pipeline.train.pair_model`); device
  auto-select cuda > mps > cpu.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.config import EvaluateParams, TrainParams, ValidateParams
from pipeline.devices import select_device
from pipeline.evaluate.validation import Validator
from pipeline.pack.shards import ShardSet, read_shard_set
from pipeline.recognition.models import interpolate_weights
from pipeline.train.checkpoint import (RunState, check_resume_dir, code_fingerprint, discard_resume_state,
                                       fingerprint, load_resume, model_checkpoint, save_atomic, save_resume,
                                       truncate_live, weights_sha256)
from pipeline.train.losses import PairLoss
from pipeline.train.pair_loader import check_shard_count, make_pair_loader
from pipeline.train.pair_model import PairModel, autocast_for, build_pair_model, train_step


# --------------------------------------------------------------------------- devices and ranks
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launch_ranks(params: TrainParams, module: str, argv: list[str], shards_dir: str | Path) -> int | None:
    """``train.nproc_per_node`` > 1 in a process that is not a rank yet: run ``python -m module argv``
    as that many ranks through torchrun (``torch.distributed.run --standalone``, a free local port)
    and return its exit code, so `dvc repro` starts DDP itself and records the model like any
    stage's output. None: this process trains (one rank, or already a rank of torchrun's). The
    shard count and, on CUDA, the GPU count are checked before anything starts."""
    n = params.nproc_per_node
    if n == 1 or "LOCAL_RANK" in os.environ:
        return None
    check_shard_count(len(read_shard_set(Path(shards_dir)).train), n, params.num_workers)
    device = select_device(params.device)
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"train.nproc_per_node={n} ranks, one per GPU, but {torch.cuda.device_count()} CUDA "
                         f"device(s) here: set it to at most that (or train.device: cpu for gloo ranks)")
    if device.type == "mps":
        raise ValueError(f"train.nproc_per_node={n}: DDP runs on cuda (nccl) or cpu (gloo), not mps")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", module, *argv]
    return subprocess.run(cmd).returncode


def all_ranks(rank: Dist, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag AND-ed over the ranks (one all-reduce): ranks stop, skip and fail together."""
    if rank.world == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


# ------------------------------------------------------------------------- schedule and checks
def lr_at(step: int, total: int, params: TrainParams) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    span = max(1, total - params.warmup_steps)
    t = min(1.0, (step - params.warmup_steps) / span)
    floor = params.lr * params.min_lr_ratio
    return floor + 0.5 * (params.lr - floor) * (1.0 + math.cos(math.pi * t))


def _check_finite(finite: bool, step: int) -> None:
    if not finite:
        raise FloatingPointError(f"non-finite loss at or before step {step} (on this or another rank): "
                                 f"lower train.lr, or check the data")


LOGGED = ("loss", "ce_raw", "ce_masked", "distill", "distill_fraction", "acc_raw", "acc_masked")


def _loss_parts(out: PairLoss) -> tuple[torch.Tensor, ...]:
    return (out.total, out.ce_raw, out.ce_masked, out.distill, out.fraction,
            out.correct_raw.float().mean(), out.correct_masked.float().mean())


# ------------------------------------------------------------------------------------ the loop
@dataclass
class Trainer:
    """Everything one run needs; :meth:`run_epoch` is the loop body, :func:`train` the driver."""

    params: TrainParams
    shards: ShardSet
    rank: Dist
    device: torch.device
    model: PairModel
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    validator: Optional[Validator]
    state: RunState
    fp: str
    resume_dir: Path
    live: Any = None
    make_loader: Callable[..., Iterable] = make_pair_loader
    loader: Any = field(default=None, repr=False)  # the train loader, built once (see train_loader)
    start: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)  # wise_alpha < 1: the start's weights

    @property
    def per_rank_batch(self) -> int:
        return max(2, self.params.batch_size // self.rank.world)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.shards.train_samples // (self.per_rank_batch * self.rank.world))

    def validate(self, epoch: int) -> None:
        """Rank 0: val metrics to dvclive and history; best.pt when val accuracy improves (every
        point without validation)."""
        if not self.rank.main:
            return
        s = self.state
        acc = -1.0
        if self.validator is not None:
            v = self.validator(self.model.net)
            acc = v["accuracy"]
            self.live.step = s.step
            for k, val in v.items():
                self.live.log_metric(f"val/{k}", float(val))
            s.history.append({"epoch": epoch, "step": s.step, **{k: float(x) for k, x in v.items()}})
        if acc > s.best or self.validator is None:
            s.best = max(s.best, acc)
            meta = {"epoch": epoch, "step": s.step, "val_accuracy": float(acc),
                    "val_identities": len(self.shards.val_identities), "train_pairs": self.shards.train_samples,
                    "world_size": self.rank.world, "params": json.loads(self.fp)["params"]}
            s.best_point = model_checkpoint(self.model.net, meta)
        self.live.summary["best_val_accuracy"] = float(s.best)
        self.live.make_summary()

    def final_checkpoint(self) -> dict:
        """Rank 0, after the last epoch: the best point moved towards the start by ``wise_alpha``, with
        the validation figures of exactly these weights in its meta and the dvclive summary
        (``model_val``): validated anew when moved (the training net is overwritten with them:
        training is over), else the best point's own figures from the history."""
        best = self.state.best_point
        ckpt = {"model": dict(best["model"]), "config": dict(best["config"]), "meta": dict(best["meta"])}
        if self.start is not None:
            ckpt["model"] = interpolate_weights(self.start, ckpt["model"], self.params.wise_alpha)
        ckpt["meta"]["wise_alpha"] = self.params.wise_alpha
        if self.validator is not None:
            if self.start is None:
                best = next(h for h in self.state.history if h["step"] == ckpt["meta"]["step"])
                v = {k: x for k, x in best.items() if k not in ("epoch", "step")}
            else:
                self.model.net.load_state_dict(ckpt["model"])
                v = {k: float(x) for k, x in self.validator(self.model.net).items()}
            ckpt["meta"]["model_val"] = v
            self.live.summary["model_val"] = v
            self.live.make_summary()
        return ckpt

    def log(self, window: dict, n: int, lr: float) -> dict[str, float]:
        """Window means to dvclive. No timings: dvclive's files are cached outputs, and a speed
        would change them on every rerun (speed is on the progress bar and in the stage's summary)."""
        metrics = {k: float(v) / n for k, v in window.items()} | {"lr": lr}
        self.live.step = self.state.step
        for k, v in metrics.items():
            self.live.log_metric(f"train/{k}", float(v))
        return metrics

    def train_loader(self, epoch: int) -> Iterable:
        """The train loader for ``epoch``: built once, then moved on with ``set_epoch`` (its workers
        persist across epochs; pass e is what a fresh loader for epoch e gives). A ``make_loader``
        whose result has no ``set_epoch`` is called again every epoch. Pinned memory on CUDA."""
        if self.loader is not None and hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
            return self.loader
        p = self.params
        self.loader = self.make_loader(self.shards.train, batch_size=self.per_rank_batch, augment=p.augment,
                                       seed=p.seed, epoch=epoch, shuffle_buffer=p.shuffle_buffer,
                                       num_workers=p.num_workers, drop_last=True,
                                       pin_memory=self.device.type == "cuda")
        return self.loader

    def run_epoch(self, epoch: int) -> int:
        """One pass over this rank's shards; returns the pairs trained on by this rank."""
        p, s = self.params, self.state
        torch.manual_seed(p.seed * 1000 + epoch)  # dropout and anything else seeded per epoch
        loader = self.train_loader(epoch)
        total_steps = self.steps_per_epoch * p.epochs
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{p.epochs}", unit="step",
                   disable=not self.rank.main)
        window: dict[str, torch.Tensor] = {}
        t_window, n_window, n_pairs, epoch_pairs = time.time(), 0, 0, 0
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        it = iter(loader)
        while True:
            batch = next(it, None)
            # ranks stop together (the first to run out) and fail together (a non-finite loss)
            alive, ok = all_ranks(self.rank, self.device, batch is not None,
                                  bool(finite) if self.rank.world > 1 else True)
            _check_finite(ok, s.step)
            if not alive:
                break
            lr = lr_at(s.step, total_steps, p)
            out = train_step(self.ddp, self.optimizer, batch, lr=lr, grad_clip=p.grad_clip,
                             device=self.device, autocast=autocast_for(self.device, p.bf16))
            s.step += 1
            bar.update(1)
            parts = _loss_parts(out)
            finite = finite & torch.isfinite(parts[0]).all()
            for k, v in zip(LOGGED, parts):  # summed as tensors: one host sync per log line
                window[k] = window.get(k, 0.0) + v.detach()
            n_window += 1
            n_pairs += len(batch[2])
            epoch_pairs += len(batch[2])
            if s.step % p.log_every == 0:
                if self.rank.world == 1:  # with DDP every rank decides together, in all_ranks above
                    _check_finite(bool(finite), s.step)
                if self.rank.main:
                    m = self.log(window, n_window, lr)
                    pairs_s = n_pairs * self.rank.world / max(time.time() - t_window, 1e-9)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", acc_m=f"{m['acc_masked']:.2f}", pairs_s=f"{pairs_s:.1f}")
                window, t_window, n_window, n_pairs = {}, time.time(), 0, 0
            if p.val_every and s.step % p.val_every == 0:
                self.validate(epoch + 1)
                if self.rank.world > 1:
                    dist.barrier()
        bar.close()
        _check_finite(bool(finite), s.step)
        return epoch_pairs


# ------------------------------------------------------------------------ setup and the driver
def centre_init(params: TrainParams) -> str:
    """``train.arcface.init`` resolved: auto = class means for a pretrained start, else random."""
    if params.arcface.init != "auto":
        return params.arcface.init
    return "random" if params.pretrained == "none" else "class_means"


@torch.no_grad()
def imprint_class_centres(model: PairModel, shards: list[Path], *, batch_size: int, device: torch.device,
                          rank: Dist, num_workers: int = 0) -> int:
    """Set each ArcFace centre to its class's mean unit embedding of the raw twins (no
    augmentation) under the starting network: weight imprinting (Qi et al., CVPR 2018). A
    pretrained network then starts with a sensible classifier instead of one whose random centres
    send large, arbitrary gradients into it. Ranks sum over their own shards, then all-reduce.
    Returns the number of classes imprinted (the others keep their random centres)."""
    sums = torch.zeros(model.head.weight.shape, dtype=torch.float32, device=device)
    loader = make_pair_loader(shards, batch_size=batch_size, augment=None, seed=0, drop_last=False,
                              rank=rank.rank, world=rank.world, num_workers=num_workers)
    was_training = model.net.training
    model.net.eval()
    for raw, _, labels in tqdm(loader, desc="imprint class centres", unit="batch", disable=not rank.main):
        emb = nn.functional.normalize(model.net(raw.to(device)).float())
        sums.index_add_(0, labels.to(device), emb)
    model.net.train(was_training)
    if rank.world > 1:
        dist.all_reduce(sums)
    have = sums.norm(dim=1) > 0
    model.head.weight[have] = nn.functional.normalize(sums[have]).to(model.head.weight.dtype)
    return int(have.sum())


def setup(params: TrainParams, shards_dir: Path, resume_dir: Path, make_loader: Callable[..., Iterable],
          evaluate: EvaluateParams | None = None, validate: ValidateParams | None = None) -> Trainer:
    """Shards, device, process group, model, optimiser and the resume state, checked before any
    training step."""
    shards = read_shard_set(shards_dir)
    if not shards.train:
        raise FileNotFoundError(f"{shards_dir}: no train-*.tar shards (run the pack stage)")
    if params.augment.masked_geometry == "detected" and not shards.standalone_twins:
        raise ValueError(f"train.augment.masked_geometry 'detected' trains on masked twins aligned on their own, "
                         f"and {shards_dir} holds none: set align.standalone_twin_splits: [train], then "
                         f"`dvc repro` reruns align and pack")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    check_shard_count(len(shards.train), world_env, params.num_workers)
    device = select_device(params.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu" and world_env > 1:  # one process per core share, not all on every core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_env))
    rank = init_distributed(device)
    model, optimizer = build_pair_model(params, len(shards.classes), device, shards.template)
    fp = fingerprint(params, shards.fingerprint, rank.world, code_fingerprint())
    start = None
    if params.wise_alpha < 1:  # the pretrained weights, before any step (or resume) moves them
        start = {k: v.detach().to("cpu", copy=True) for k, v in model.net.state_dict().items()}
    state = load_resume(resume_dir, fp, model, optimizer)
    if not state.resumed and params.arcface.weight > 0 and centre_init(params) == "class_means":
        imprint_class_centres(model, shards.train, batch_size=max(64, params.batch_size // rank.world),
                              device=device, rank=rank, num_workers=params.num_workers)
    ddp: nn.Module = model
    if rank.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    validator = None
    if shards.val:
        validator = Validator(shards.val, shards.template, device, max(64, 2 * max(2, params.batch_size // rank.world)),
                              evaluate, validate)
    return Trainer(params, shards, rank, device, model, ddp, optimizer, validator, state, fp, resume_dir,
                   make_loader=make_loader, start=start)


def train(*, params: TrainParams, shards_dir: str | Path, out_dir: str | Path, live_dir: str | Path,
          resume_dir: str | Path, make_loader: Callable[..., Iterable] | None = None,
          evaluate: EvaluateParams | None = None, validate: ValidateParams | None = None) -> dict:
    """Train on ``shards_dir``; write ``out_dir``/model.pt (best on validation) and dvclive logs.
    ``resume_dir`` keeps the resume state while the run is unfinished (deleted at the end).
    ``evaluate`` / ``validate``: the settings validation scores with (params.yaml's sections).

    Returns a summary dict (rank 0; other ranks get theirs too, without the files)."""
    out_dir, live_dir, resume_dir = Path(out_dir), Path(live_dir), Path(resume_dir)
    check_resume_dir(resume_dir, out_dir, live_dir, Path(shards_dir))
    made_resume_dir = not resume_dir.exists()
    tr = setup(params, Path(shards_dir), resume_dir, make_loader or make_pair_loader, evaluate, validate)
    s = tr.state
    if tr.rank.main:
        from dvclive import Live

        resume_dir.mkdir(parents=True, exist_ok=True)
        if s.resumed:
            truncate_live(live_dir, s.step)
            print(f"resuming from {resume_dir / 'last.pt'} at epoch {s.epoch}, step {s.step}")
        tr.live = Live(str(live_dir), resume=s.resumed, save_dvc_exp=False, dvcyaml=None)
        if not s.resumed:
            tr.validate(0)  # the chance-level starting point of the val curve

    tr.model.train()
    t_start, run_pairs = time.time(), 0
    for epoch in range(s.epoch, params.epochs):
        run_pairs += tr.run_epoch(epoch)
        # end of epoch: validate, then the resume point (after best.pt, so both agree)
        if not (params.val_every and s.step % params.val_every == 0):
            tr.validate(epoch + 1)
        s.epoch = epoch + 1
        if tr.rank.main:
            save_resume(resume_dir, tr.fp, s, tr.model, tr.optimizer)
        if tr.rank.world > 1:
            dist.barrier()

    wall = time.time() - t_start
    summary = {"epochs": params.epochs, "steps": s.step, "best_val_accuracy": float(s.best),
               "train_pairs": tr.shards.train_samples, "val_identities": len(tr.shards.val_identities),
               "world_size": tr.rank.world, "rank": tr.rank.rank, "device": str(tr.device),
               "resumed": s.resumed, "wall_s": round(wall, 1),
               "pairs_per_s": round(run_pairs * tr.rank.world / max(wall, 1e-9), 2), "history": s.history,
               "weights_sha256": weights_sha256(tr.model.net)}
    if tr.device.type == "cuda":
        summary["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(tr.device) / 2**30, 2)
    if tr.rank.main:
        # the finished run's output, then its resume state goes
        save_atomic(tr.final_checkpoint(), out_dir / "model.pt")
        discard_resume_state(resume_dir, remove_folder=made_resume_dir or s.resumed)
        tr.live.end()
    if tr.rank.world > 1:
        dist.destroy_process_group()
    return summary
