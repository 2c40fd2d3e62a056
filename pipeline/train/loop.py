"""The training loop: pairs of (raw, masked) faces -> embedding net + ArcFace + distillation.

One readable loop in the spirit of nanoGPT's train.py. What it guarantees:

- Model selection never sees the test set: pack holds out a seeded share of the TRAIN identities
  (``val-*.tar``, never in a training step); verification pairs among them, probe side masked, give
  ``val/accuracy``; the best point by it, moved back towards the pretrained start by
  ``wise_alpha`` (WiSE-FT), becomes ``models/model.pt``, validated once more as it is written.
- Resume without stale results: the resume state (``last.pt``, the best point inside it) lives in
  its own folder OUTSIDE the DVC output, written atomically after every epoch. It is resumed only when its
  fingerprint matches: params, shard hashes, world size AND the code (every .py of pipeline/ and
  stages/), so a code change always trains from scratch. A finished run deletes it, so a finished
  run is never "resumed". Data order and dropout are seeded by (seed, epoch): a killed and resumed
  run writes a model.pt byte-identical to an uninterrupted one, and ``models/`` holds only that file.
- DDP under torchrun (nccl on CUDA, gloo on CPU): shards are split across ranks by the pair loader
  (every rank x worker needs a shard: checked before training), ranks stop together at the
  shortest rank's end and together on a non-finite loss; only rank 0 logs and writes.
- bf16 autocast on CUDA, channels_last on CUDA and CPU; device auto-select cuda > mps > cpu.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.align.geometry import LEGACY_TEMPLATE
from pipeline.config import EvaluateParams, TrainParams, ValidateParams
from pipeline.devices import select_device
from pipeline.recognition.dlib_resnet import Affine
from pipeline.recognition.embedders import TorchEmbedder
from pipeline.evaluate.evaluation import embed_chunks
from pipeline.train.losses import ArcFace, PairLoss, pair_loss
from pipeline.recognition.models import build_embedding_net, interpolate_weights, make_net
from pipeline.pack.shards import ShardSet, read_shard_set
from pipeline.train.pair_loader import check_shard_count, make_pair_loader
from pipeline.data.tar_chunks import dumps_json
from pipeline.evaluate.validation import score_validation, training_figures

CHECKPOINT_FORMAT = 3  # 3: the best point travels inside last.pt (no best.pt)
CODE_DIRS = ("pipeline", "stages")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Params that change how fast, not what is learned: a checkpoint stays resumable across them.
_NOT_FINGERPRINTED = ("num_workers", "device")


# ----------------------------------------------------------------------------- devices and ranks
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def channels_last(device: torch.device) -> bool:
    """NHWC activations: faster convolutions with cuDNN, and with oneDNN on CPU (ResNet18 step +9%
    on 2 cores)."""
    return device.type in ("cuda", "cpu")


def autocast_for(device: torch.device, bf16: bool) -> Callable[[], Any]:
    """bf16 autocast on CUDA (the tensor cores' fast path); plain fp32 elsewhere."""
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


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


# ----------------------------------------------------------------------------- data
def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """sha256 over every .py of pipeline/ and stages/ (path and bytes): a superset of what DVC
    hashes for the train stage, so no code change can resume a checkpoint made by other code."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


class Validator:
    """The validate stage's figures of the net being trained (:mod:`pipeline.evaluate.validation`: the
    held-out train people in the val shards, through evaluate's embedder path and scoring, without
    the intervals), read afresh from the shards at each call: nothing is held between validations.
    ``accuracy`` (masked-unmasked verification) picks the checkpoint; unmasked accuracy and rank-1
    without masks are logged beside it, where forgetting shows first."""

    def __init__(self, val_shards: list[Path], template: str, device: torch.device, batch_size: int,
                 evaluate: EvaluateParams | None = None, validate: ValidateParams | None = None):
        self.shards, self.template, self.device, self.batch_size = val_shards, template, device, batch_size
        self.evaluate, self.validate = evaluate or EvaluateParams(), validate or ValidateParams()

    def __call__(self, net: nn.Module) -> dict[str, float]:
        was_training = net.training
        try:  # TorchEmbedder puts the net in eval mode and runs it in fp32
            emb = embed_chunks(TorchEmbedder(net=net, device=str(self.device)), self.shards, template=self.template,
                               flip=self.evaluate.flip, batch_size=self.batch_size, where="the val shards")
        finally:
            net.train(was_training)
        metrics, _ = score_validation(emb, evaluate=self.evaluate, validate=self.validate, intervals=False)
        return training_figures(metrics)


# ----------------------------------------------------------------------------- model and schedule
class PairModel(nn.Module):
    """Embedding net + ArcFace head; one forward = both twins through the net in one batch (shared
    BN statistics, one kernel launch) and the pair loss. DDP wraps this."""

    def __init__(self, net: nn.Module, head: ArcFace, params: TrainParams, teacher: nn.Module | None = None):
        super().__init__()
        self.net, self.head, self.p, self.ce_weight = net, head, params.distill, params.arcface.weight
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> "PairModel":
        super().train(mode)
        if self.teacher is not None:  # the frozen teacher always embeds as at inference
            self.teacher.eval()
        return self

    def forward(self, raw: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor) -> PairLoss:
        emb = self.net(torch.cat([raw, masked]))
        e_raw, e_masked = emb.float().chunk(2)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(raw).float()
        with torch.autocast(emb.device.type, enabled=False):  # margins and cosines in fp32
            return pair_loss(self.head, e_raw, e_masked, labels, kind=self.p.kind, beta=self.p.beta,
                             margin=self.p.margin, dynamic=self.p.dynamic, stop_grad=self.p.stop_grad,
                             ce_weight=self.ce_weight, teacher=teacher, raw_weight=self.p.raw_weight)


def build_pair_model(params: TrainParams, num_classes: int, device: torch.device,
                     template: str = LEGACY_TEMPLATE) -> tuple[PairModel, torch.optim.Optimizer]:
    """Seeded embedding net + ArcFace head (+ the frozen teacher: a copy of the starting net) on
    ``device`` (channels_last where it helps) and its Adam: the pretrained network's parameters at
    ``lr * backbone_lr_ratio``, the new ones (ArcFace centres; a torchvision net's new head) at
    ``lr``; dlib_resnet's folded BatchNorm (affine) layers frozen with ``freeze_affine``."""
    torch.manual_seed(params.seed)
    net = build_embedding_net(params.backbone, params.embedding_dim, params.dropout,
                              params.pretrained, params.pretrained_path, template)
    dim = net.config["embedding_dim"]
    head = ArcFace(dim, num_classes, params.arcface.s, params.arcface.m)
    teacher = None
    if params.distill.teacher == "frozen":  # a second copy of the starting weights
        teacher = make_net(net.config["backbone"], net.config["embedding_dim"], net.config["dropout"], template)
        teacher.load_state_dict(net.state_dict())
    model = PairModel(net, head, params, teacher).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if params.freeze_affine:
        for m in net.modules():
            if isinstance(m, Affine):
                m.requires_grad_(False)
    pretrained, new = [], list(head.parameters())
    for name, p in net.named_parameters():
        if p.requires_grad:
            fresh = params.pretrained == "imagenet" and name.startswith("head.")
            (new if fresh or params.pretrained == "none" else pretrained).append(p)
    groups = [{"params": new, "lr_ratio": 1.0}]
    if pretrained:
        groups.append({"params": pretrained, "lr_ratio": params.backbone_lr_ratio})
    # fused Adam: one kernel over all tensors; the per-tensor loop costs ~7% of a CPU step
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(groups, lr=params.lr, weight_decay=params.weight_decay, fused=fused or None)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, *, lr: float, grad_clip: float,
               device: torch.device, autocast: Any = nullcontext) -> PairLoss:
    """One optimiser step on a batch of twins (the loop and benchmarks/train_step.py share it)."""
    raw, masked, labels = (t.to(device, non_blocking=True) for t in batch)
    if channels_last(device):
        raw = raw.contiguous(memory_format=torch.channels_last)
        masked = masked.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    with autocast():
        out = model(raw, masked, labels)
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out


def lr_at(step: int, total: int, params: TrainParams) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    span = max(1, total - params.warmup_steps)
    t = min(1.0, (step - params.warmup_steps) / span)
    floor = params.lr * params.min_lr_ratio
    return floor + 0.5 * (params.lr - floor) * (1.0 + math.cos(math.pi * t))


def weights_sha256(net: nn.Module) -> str:
    """A hash of the trainable weights (names, shapes, bytes): equal on every DDP rank (BatchNorm's
    running statistics are not weights: each rank's last batch updates its own)."""
    h = hashlib.sha256()
    for k, v in sorted(net.named_parameters()):
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(params: TrainParams, data_fingerprint: str, world: int, code: str) -> str:
    p = params.model_dump(mode="json")
    for k in _NOT_FINGERPRINTED:
        p.pop(k, None)
    return dumps_json({"params": p, "data": data_fingerprint, "world": world, "code": code}).decode()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_checkpoint(net: nn.Module, meta: dict) -> dict:
    """The stage's model file: embedding net only (no ArcFace head), plain types + tensors."""
    return {"model": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
            "config": dict(net.config), "meta": meta}


def _truncate_live(live_dir: Path, last_step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (the killed run's tail)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        head, rows = lines[:1], lines[1:]
        col = head[0].split("\t").index("step") if head else 0
        kept = [r for r in rows if int(r.split("\t")[col]) <= last_step]
        tsv.write_text("\n".join(head + kept) + "\n")


@dataclass
class RunState:
    """Where a run stands; with the weights and optimiser it is the resume state."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    resumed: bool = False
    best_point: dict | None = None  # model_checkpoint() of the best validation point


def load_resume(resume_dir: Path, fp: str, model: "PairModel",
                optimizer: torch.optim.Optimizer) -> RunState:
    """The state of an interrupted run of exactly this fingerprint, else a fresh state."""
    path = resume_dir / "last.pt"
    if not path.is_file():
        return RunState()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("fingerprint") != fp or ckpt.get("format") != CHECKPOINT_FORMAT:
        print(f"ignoring {path}: made by other params, data or code (fresh start)")
        return RunState()
    model.net.load_state_dict(ckpt["model"])
    model.head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return RunState(ckpt["epoch"], ckpt["step"], ckpt["best_val_accuracy"], json.loads(ckpt["history"]), True,
                    ckpt["best_point"])


def save_resume(resume_dir: Path, fp: str, state: RunState, model: "PairModel",
                optimizer: torch.optim.Optimizer) -> None:
    """One file, written atomically, holds the whole resume point, the best point included: a kill
    before the rename resumes from the epoch before (replayed to the same weights), after it from
    this one; never a best point of one epoch with the training state of another."""
    save_atomic({"format": CHECKPOINT_FORMAT, "fingerprint": fp, "epoch": state.epoch, "step": state.step,
                 "best_val_accuracy": float(state.best), "history": json.dumps(state.history),
                 "model": model.net.state_dict(), "head": model.head.state_dict(),
                 "optimizer": optimizer.state_dict(), "best_point": state.best_point},
                resume_dir / "last.pt")


RESUME_FILES = ("last.pt", "last.pt.tmp")  # all the trainer ever writes into the resume folder


def discard_resume_state(resume_dir: Path, remove_folder: bool = True) -> None:
    """A finished run's resume state goes (a finished run is never "resumed"): the trainer's own
    files only, then the folder when it is left empty and ``remove_folder`` (the trainer made it)."""
    for name in RESUME_FILES:
        (resume_dir / name).unlink(missing_ok=True)
    if remove_folder and resume_dir.is_dir() and not any(resume_dir.iterdir()):
        resume_dir.rmdir()


PROJECT_MARKERS = (".git", ".dvc", "dvc.yaml")


def dvc_outputs(project: Path) -> list[Path]:
    """Every output path dvc.yaml names (outs, metrics, plots), templated ones (``data/${key}/x``)
    cut at their first template part, relative to ``project``; none without a dvc.yaml."""
    import yaml

    spec = project / "dvc.yaml"
    if not spec.is_file():
        return []
    paths = []
    for stage in (yaml.safe_load(spec.read_text()) or {}).get("stages", {}).values():
        stage = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                if isinstance(name, str):
                    parts = Path(name.split("${")[0]).parts if "${" in name else Path(name).parts
                    if parts:
                        paths.append(project / Path(*parts))
    return paths


def check_resume_dir(resume_dir: Path, *keep: Path, project: Path | None = None) -> None:
    """Refuse a resume folder the trainer could harm: the project root or a folder above it (or
    one holding .git, .dvc or dvc.yaml), a DVC output or a folder holding or inside one, or one of
    ``keep`` (the run's own outputs and inputs). The trainer only ever deletes its own files there,
    and these rules keep even those away from what DVC tracks."""
    project = (project or Path.cwd()).resolve()
    r = resume_dir.resolve()

    def overlaps(p: Path) -> bool:
        p = p.resolve()
        return r == p or p.is_relative_to(r) or r.is_relative_to(p)

    if project.is_relative_to(r) or any((r / m).exists() for m in PROJECT_MARKERS):
        raise ValueError(f"--resume-dir {resume_dir}: the project root or a folder holding one; "
                         "use a folder of its own (the default checkpoints/train)")
    for p in (*keep, *dvc_outputs(project)):
        if overlaps(p):
            raise ValueError(f"--resume-dir {resume_dir}: overlaps {p} (a DVC output, or the run's own "
                             "input or output); use a folder of its own (the default checkpoints/train)")


def all_ranks(rank: Dist, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag AND-ed over the ranks (one all-reduce): ranks stop, skip and fail together."""
    if rank.world == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def _check_finite(finite: bool, step: int) -> None:
    if not finite:
        raise FloatingPointError(f"non-finite loss at or before step {step} (on this or another rank): "
                                 f"lower train.lr, or check the data")


LOGGED = ("loss", "ce_raw", "ce_masked", "distill", "distill_fraction", "acc_raw", "acc_masked")


def _loss_parts(out: PairLoss) -> tuple[torch.Tensor, ...]:
    return (out.total, out.ce_raw, out.ce_masked, out.distill, out.fraction,
            out.correct_raw.float().mean(), out.correct_masked.float().mean())


# ----------------------------------------------------------------------------- the loop
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
            _truncate_live(live_dir, s.step)
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
