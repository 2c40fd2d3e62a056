"""The training loop: pairs of (raw, masked) faces -> embedding net + ArcFace + distillation.

One readable loop in the spirit of nanoGPT's train.py. What it guarantees:

- Model selection never sees the test set: a seeded share of the TRAIN identities is held out (never
  in a training step); verification pairs among them, probe side masked, give ``val/accuracy``; the
  best epoch by it is ``models/model.pt``.
- Resume: ``models/last.pt`` is written atomically after every epoch with everything the next epoch
  needs (weights, optimiser, step, best so far). The data order and dropout are seeded by
  (seed, epoch), so a killed and resumed run ends with the same weights as an uninterrupted one.
  A checkpoint from other params or other shards is ignored (fresh start).
- DDP under torchrun (nccl on CUDA, gloo on CPU): shards are split across ranks by the pair loader,
  ranks stop together at the shortest rank's end, only rank 0 logs and writes.
- bf16 autocast on CUDA, channels_last on CUDA and CPU; device auto-select cuda > mps > cpu.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainParams
from pipeline.losses import ArcFace, PairLoss, pair_loss
from pipeline.metrics import auc, kfold_accuracy, roc_curve
from pipeline.models import build_embedding_net
from pipeline.tar_chunks import dumps_json, file_sha256, list_chunks

CHECKPOINT_FORMAT = 1
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


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = cuda, else mps, else cpu. Asking for an absent device is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device=mps but MPS is not available")
    return torch.device(name)


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


# ----------------------------------------------------------------------------- data
def _image_dataset(shards_dir: Path) -> tuple[list[Path], dict[str, int], str]:
    shards = list_chunks(shards_dir, "train-")
    classes_file = shards_dir / "classes.json"
    if not shards or not classes_file.is_file():
        raise FileNotFoundError(f"{shards_dir}: no train-*.tar shards or classes.json (run the pack stage)")
    classes = json.loads(classes_file.read_text())
    index = shards_dir / "index.json"
    fingerprint = file_sha256(index) if index.is_file() else dumps_json([file_sha256(s) for s in shards]).decode()
    return shards, classes, fingerprint


def split_val_identities(classes: dict[str, int], fraction: float, seed: int,
                         max_identities: int | None = None) -> list[int]:
    """Labels of the held-out validation identities: a seeded choice among sorted identity names."""
    if fraction <= 0:
        return []
    names = sorted(classes)
    n_val = max(2, min(int(round(fraction * len(names))), max_identities or len(names)))
    if n_val >= len(names):
        raise ValueError(f"train.val_fraction={fraction} leaves no training identities ({len(names)} in all)")
    rng = np.random.default_rng([seed, 1])
    return sorted(classes[names[i]] for i in rng.permutation(len(names))[:n_val])


def drop_identities(batch: tuple[torch.Tensor, ...], labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch without the pairs whose label is in ``labels`` (the held-out identities)."""
    keep = ~torch.isin(batch[2], labels)
    return tuple(t[keep] for t in batch)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the loader's (x/255 - 0.5)/0.5, exact for 8-bit images (halves the val memory)."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


@dataclass
class ValSet:
    raw: torch.Tensor  # N x 3 x 112 x 112 uint8
    masked: torch.Tensor
    labels: np.ndarray
    n_train: int  # training pairs (all train-shard samples minus the validation identities)


def collect_val(batches: Iterable, val_labels: list[int], max_per_identity: int = 1 << 30) -> ValSet:
    """One pass over the train shards (no augmentation): keep the validation identities' pairs (the
    first ``max_per_identity`` of each, in the shards' shuffled order, so one big identity does not
    fill the validation) and count the rest. Runs before the process group starts, so every rank
    sees every shard."""
    val = torch.tensor(val_labels, dtype=torch.int64)
    raws, maskeds, labels, n_train = [], [], [], 0
    seen: dict[int, int] = {}
    for raw, masked, label in tqdm(batches, desc="validation set", unit="batch"):
        in_val = torch.isin(label, val)
        n_train += int((~in_val).sum())
        keep = in_val.clone()
        for i in torch.nonzero(in_val).flatten().tolist():
            c = seen[int(label[i])] = seen.get(int(label[i]), 0) + 1
            keep[i] = c <= max_per_identity
        if keep.any():
            raws.append(to_uint8(raw[keep]))
            maskeds.append(to_uint8(masked[keep]))
            labels.append(label[keep])
    if not labels:
        empty = torch.zeros(0, 3, 112, 112, dtype=torch.uint8)
        return ValSet(empty, empty, np.zeros(0, np.int64), n_train)
    return ValSet(torch.cat(raws), torch.cat(maskeds), torch.cat(labels).numpy(), n_train)


def val_pairs(labels: np.ndarray, seed: int, max_pairs: int, folds: int = 10) -> dict[str, np.ndarray]:
    """Balanced same/different pairs (gallery side raw image i, probe side masked image j, i != j),
    at most max_pairs // 2 of each, seeded; each pair gets one of ``folds`` folds."""
    rng = np.random.default_rng([seed, 2])
    labels = np.asarray(labels)
    by_id = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    same = [(a, b) for idx in by_id.values() for a in idx for b in idx if a != b]
    half = max_pairs // 2
    if len(same) > half:
        same = [same[i] for i in np.sort(rng.choice(len(same), half, replace=False))]
    n = len(same)
    a = rng.integers(0, len(labels), size=4 * n + 8)
    b = rng.integers(0, len(labels), size=4 * n + 8)
    diff = [(i, j) for i, j in zip(a, b) if labels[i] != labels[j]][:n]
    pairs = np.array(same + diff, dtype=np.int64).reshape(-1, 2)
    issame = np.r_[np.ones(len(same), bool), np.zeros(len(diff), bool)]
    fold = rng.permutation(len(pairs)) % folds
    return {"gallery": pairs[:, 0], "probe": pairs[:, 1], "same": issame, "fold": fold}


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int,
          autocast: Any) -> np.ndarray:
    """L2-normalised embeddings of uint8 images, in eval mode (the caller restores train mode)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i:i + batch_size]).to(device)
        if channels_last(device):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            e = net(x).float()
        out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def validate(net: nn.Module, valset: ValSet, pairs: dict[str, np.ndarray], device: torch.device,
             batch_size: int, autocast: Any) -> dict[str, float]:
    """Verification on held-out train identities: raw gallery vs masked probe (and raw vs raw)."""
    was_training = net.training
    net.eval()
    try:
        e_raw = embed(net, valset.raw, device, batch_size, autocast)
        e_masked = embed(net, valset.masked, device, batch_size, autocast)
    finally:
        net.train(was_training)
    out = {}
    for name, probe in (("accuracy", e_masked), ("accuracy_raw", e_raw)):
        scores = np.sum(e_raw[pairs["gallery"]] * probe[pairs["probe"]], axis=1)
        out[name] = kfold_accuracy(scores, pairs["same"], pairs["fold"]).accuracy
        if name == "accuracy":
            out["auc"] = auc(*roc_curve(scores, pairs["same"])[:2])
    return out


# ----------------------------------------------------------------------------- model and schedule
class PairModel(nn.Module):
    """Embedding net + ArcFace head; one forward = both twins through the net in one batch (shared
    BN statistics, one kernel launch) and the pair loss. DDP wraps this."""

    def __init__(self, net: nn.Module, head: ArcFace, params: TrainParams):
        super().__init__()
        self.net, self.head, self.p = net, head, params.distill

    def forward(self, raw: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor) -> PairLoss:
        emb = self.net(torch.cat([raw, masked]))
        e_raw, e_masked = emb.float().chunk(2)
        with torch.autocast(emb.device.type, enabled=False):  # margins and cosines in fp32
            return pair_loss(self.head, e_raw, e_masked, labels, kind=self.p.kind, beta=self.p.beta,
                             margin=self.p.margin, dynamic=self.p.dynamic, stop_grad=self.p.stop_grad)


def build_pair_model(params: TrainParams, num_classes: int,
                     device: torch.device) -> tuple[PairModel, torch.optim.Optimizer]:
    """Seeded embedding net + ArcFace head on ``device`` (channels_last where it helps) and its Adam."""
    torch.manual_seed(params.seed)
    net = build_embedding_net(params.backbone, params.embedding_dim, params.dropout,
                              params.pretrained, params.pretrained_path)
    head = ArcFace(params.embedding_dim, num_classes, params.arcface.s, params.arcface.m)
    model = PairModel(net, head, params).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    # fused Adam: one kernel over all tensors; the per-tensor loop costs ~7% of a CPU step
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                                 fused=fused or None)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, *, lr: float, grad_clip: float,
               device: torch.device, autocast: Any = nullcontext) -> PairLoss:
    """One optimiser step on a batch of twins (the loop and benchmarks/train_step.py share it)."""
    raw, masked, labels = (t.to(device, non_blocking=True) for t in batch)
    if channels_last(device):
        raw = raw.contiguous(memory_format=torch.channels_last)
        masked = masked.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
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


def fingerprint(params: TrainParams, data_fingerprint: str, world: int) -> str:
    p = params.model_dump(mode="json")
    for k in _NOT_FINGERPRINTED:
        p.pop(k, None)
    return dumps_json({"params": p, "data": data_fingerprint, "world": world}).decode()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_checkpoint(net: nn.Module, meta: dict) -> dict:
    """The stage's model file: embedding net only (no ArcFace head), plain types + tensors."""
    return {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "config": dict(net.config), "meta": meta}


def _truncate_live(live_dir: Path, last_step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (the killed run's tail)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        head, rows = lines[:1], lines[1:]
        col = head[0].split("\t").index("step") if head else 0
        kept = [r for r in rows if int(r.split("\t")[col]) <= last_step]
        tsv.write_text("\n".join(head + kept) + "\n")


def _default_loader() -> Callable[..., Iterable]:
    from pipeline.pair_loader import make_pair_loader
    return make_pair_loader


# ----------------------------------------------------------------------------- the loop
def train(*, params: TrainParams, shards_dir: str | Path, out_dir: str | Path, live_dir: str | Path,
          make_loader: Callable[..., Iterable] | None = None) -> dict:
    """Train on ``shards_dir``/train-*.tar; write model.pt, last.pt (out_dir) and dvclive logs.

    Returns a summary dict (rank 0; other ranks get theirs too, without the files)."""
    make_loader = make_loader or _default_loader()
    shards_dir, out_dir, live_dir = Path(shards_dir), Path(out_dir), Path(live_dir)
    shards, classes, data_fp = _image_dataset(shards_dir)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(params.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu" and world_env > 1:  # one process per core share, not all on every core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_env))

    # The validation set is read before the process group exists, so every rank reads all shards.
    val_labels = split_val_identities(classes, params.val_fraction, params.seed, params.val_max_identities)
    valset = collect_val(make_loader(shards, batch_size=params.batch_size, augment=None,
                                     seed=params.seed, drop_last=False, num_workers=params.num_workers),
                         val_labels, params.val_images_per_identity)
    if params.val_fraction > 0 and len(np.unique(valset.labels)) < 2:
        raise ValueError("validation needs >= 2 held-out identities with images in the train shards")
    pairs = val_pairs(valset.labels, params.seed, params.val_max_pairs) if len(valset.labels) else None

    rank = init_distributed(device)
    per_rank_batch = max(2, params.batch_size // rank.world)
    # the loader's batches hold validation identities too (filtered out per batch)
    steps_per_epoch = max(1, (valset.n_train + len(valset.labels)) // (per_rank_batch * rank.world))
    total_steps = steps_per_epoch * params.epochs
    cuda = device.type == "cuda"
    autocast = autocast_for(device, params.bf16)

    model, optimizer = build_pair_model(params, len(classes), device)

    fp = fingerprint(params, data_fp, rank.world)
    last_path, best_path = out_dir / "last.pt", out_dir / "model.pt"
    start_epoch, step, best, history = 0, 0, -1.0, []
    resumed = False
    if last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") == fp and ckpt.get("format") == CHECKPOINT_FORMAT:
            model.net.load_state_dict(ckpt["model"])
            model.head.load_state_dict(ckpt["head"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best_val_accuracy"]
            history = json.loads(ckpt["history"])
            resumed = True
    ddp = model
    if rank.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    live = None
    if rank.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from dvclive import Live
        if resumed:
            _truncate_live(live_dir, step)
        live = Live(str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None)
        if resumed:
            print(f"resuming from {last_path} at epoch {start_epoch}, step {step}")

    def run_validation(epoch: int) -> float:
        """Rank 0 validates; returns val accuracy (-1 without validation); saves model.pt if best."""
        nonlocal best
        if not rank.main:
            return -1.0
        acc = -1.0
        if pairs is not None:
            v = validate(model.net, valset, pairs, device, max(64, per_rank_batch * 2), autocast)
            acc = v["accuracy"]
            live.step = step
            for k, val in v.items():
                live.log_metric(f"val/{k}", float(val))
            history.append({"epoch": epoch, "step": step, **{k: float(x) for k, x in v.items()}})
        if acc > best or pairs is None:
            best = max(best, acc)
            meta = {"epoch": epoch, "step": step, "val_accuracy": float(acc),
                    "val_identities": len(val_labels), "train_pairs": valset.n_train,
                    "world_size": rank.world, "params": json.loads(fp)["params"]}
            save_atomic(model_checkpoint(model.net, meta), best_path)
        live.summary["best_val_accuracy"] = float(best)
        live.make_summary()
        return acc

    if rank.main and not resumed and start_epoch == 0:
        run_validation(0)  # the chance-level starting point of the val curve

    model.train()
    t_start, run_pairs = time.time(), 0
    for epoch in range(start_epoch, params.epochs):
        torch.manual_seed(params.seed * 1000 + epoch)  # dropout and anything else seeded per epoch
        loader = make_loader(shards, batch_size=per_rank_batch, augment=params.augment, seed=params.seed,
                             epoch=epoch, shuffle_buffer=params.shuffle_buffer,
                             num_workers=params.num_workers, drop_last=True)
        it = iter(loader)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{params.epochs}", unit="step",
                   disable=not rank.main)
        window: dict[str, float] = {}
        t_window, n_window, n_pairs = time.time(), 0, 0
        val_labels_t = torch.tensor(val_labels, dtype=torch.int64)
        while True:
            batch = next(it, None)
            if batch is not None:
                batch = drop_identities(batch, val_labels_t)  # validation identities never train
            usable = batch is not None and len(batch[2]) >= 1  # twins are one batch: BatchNorm sees 2+
            if rank.world > 1:  # ranks stop together (first to run out) and skip together
                flags = torch.tensor([batch is not None, usable], dtype=torch.int32,
                                     device=device if cuda else "cpu")
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
                alive, usable = bool(flags[0]), bool(flags[1])
            else:
                alive = batch is not None
            if not alive:
                break
            if not usable:
                continue
            lr = lr_at(step, total_steps, params)
            out = train_step(ddp, optimizer, batch, lr=lr, grad_clip=params.grad_clip, device=device,
                             autocast=autocast)
            step += 1
            bar.update(1)
            # summed as tensors: no host sync per step on a GPU, one per log line
            for k, v in (("loss", out.total), ("ce_raw", out.ce_raw), ("ce_masked", out.ce_masked),
                         ("distill", out.distill), ("distill_fraction", out.fraction),
                         ("acc_raw", out.correct_raw.float().mean()),
                         ("acc_masked", out.correct_masked.float().mean())):
                window[k] = window.get(k, 0.0) + v.detach()
            n_window += 1
            n_pairs += len(batch[2])
            run_pairs += len(batch[2])
            if rank.main and step % params.log_every == 0:
                elapsed = time.time() - t_window
                metrics = {k: float(v) / n_window for k, v in window.items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite loss near step {step}: {metrics}")
                metrics["lr"] = lr
                metrics["samples_per_s"] = n_pairs * rank.world / max(elapsed, 1e-9)
                live.step = step
                for k, v in metrics.items():
                    live.log_metric(f"train/{k}", float(v))
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc_m=f"{metrics['acc_masked']:.2f}")
                window, t_window, n_window, n_pairs = {}, time.time(), 0, 0
            if params.val_every and step % params.val_every == 0:
                run_validation(epoch + 1)
                if rank.world > 1:
                    dist.barrier()
        bar.close()
        # end of epoch: validate, then the resume point (after the model file, so both agree)
        if not (params.val_every and step % params.val_every == 0):
            run_validation(epoch + 1)
        if rank.main:
            save_atomic({"format": CHECKPOINT_FORMAT, "fingerprint": fp, "epoch": epoch + 1, "step": step,
                         "best_val_accuracy": float(best), "history": json.dumps(history),
                         "model": model.net.state_dict(), "head": model.head.state_dict(),
                         "optimizer": optimizer.state_dict()}, last_path)
        if rank.world > 1:
            dist.barrier()

    summary = {"epochs": params.epochs, "steps": step, "best_val_accuracy": float(best),
               "train_pairs": valset.n_train, "val_images": int(len(valset.labels)),
               "val_identities": len(val_labels), "world_size": rank.world, "rank": rank.rank,
               "device": str(device),
               "resumed": resumed, "wall_s": round(time.time() - t_start, 1),
               "pairs_per_s": round(run_pairs * rank.world / max(time.time() - t_start, 1e-9), 2),
               "history": history}
    if cuda:
        summary["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if rank.main:
        live.end()
    if rank.world > 1:
        dist.destroy_process_group()
    return summary
