"""Benchmark the full training step against a bare torchvision ResNet18 forward+backward.

Full step = next batch from the pair loader (decode + augmentation) + embedding net on both twins +
ArcFace on both + distillation + backward + grad clip + Adam (pipeline.train.pair_model.train_step). Bare =
torchvision resnet18() forward + backward on the same number of images (2 per pair), no loader, no
optimiser. Both run in this process, interleaved in rounds so machine load hits both alike; the
median step time of each is used. One JSON line: pairs/s of each, and overhead = full/bare - 1.

Usage: python benchmarks/train_step.py [--shards data/shards] [--batch 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.models import resnet18  # noqa: E402

from benchmarks.measure import PeakRSS, emit  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.train.pair_loader import make_pair_loader  # noqa: E402
from pipeline.devices import select_device  # noqa: E402
from pipeline.align.geometry import get_template  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402
from pipeline.train.pair_model import autocast_for, build_pair_model, channels_last, train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and kind")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=None, help="default: train.num_workers")
    args = ap.parse_args()
    params = load_params(args.params).train
    device = select_device(args.device)
    cuda = device.type == "cuda"
    nhwc = channels_last(device)  # the bare model gets the memory format the training step uses
    autocast = autocast_for(device, params.bf16)
    shard_set = read_shard_set(Path(args.shards))
    shards = shard_set.train
    side = get_template(shard_set.template).size

    model, optimizer = build_pair_model(params, len(shard_set.classes), device, shard_set.template)
    model.train()
    bare = resnet18().to(device)
    if nhwc:
        bare = bare.to(memory_format=torch.channels_last)
    bare.train()
    x_bare = torch.rand(2 * args.batch, 3, side, side, device=device) * 2 - 1

    def batches():
        epoch = 0
        while True:
            yield from make_pair_loader(shards, batch_size=args.batch, augment=params.augment, seed=params.seed,
                                        epoch=epoch, num_workers=workers, drop_last=True)
            epoch += 1

    workers = params.num_workers if args.num_workers is None else args.num_workers
    it = batches()

    def full_step() -> None:
        batch = next(it)
        train_step(model, optimizer, batch, lr=params.lr, grad_clip=params.grad_clip, device=device,
                   autocast=autocast)

    def bare_step() -> None:
        x = x_bare.contiguous(memory_format=torch.channels_last) if nhwc else x_bare
        with autocast():
            out = bare(x)
        bare.zero_grad(set_to_none=True)
        out.float().sum().backward()

    times = {"full": [], "bare": []}
    with PeakRSS() as rss:
        full_step(), bare_step()  # warm-up (allocator, cudnn autotune, loader start)
        for _ in range(args.rounds):
            for name, fn in (("bare", bare_step), ("full", full_step)):
                for _ in range(args.steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
    full, bare_t = statistics.median(times["full"]), statistics.median(times["bare"])
    figures = {"stage": "train_step", "device": str(device), "batch_pairs": args.batch,
               "images_per_step": 2 * args.batch, "threads": torch.get_num_threads(),
               "backbone": params.backbone, "embedding_dim": model.net.config["embedding_dim"],
               "full_pairs_per_s": round(args.batch / full, 2), "bare_pairs_per_s": round(args.batch / bare_t, 2),
               "full_images_per_s": round(2 * args.batch / full, 1), "bare_images_per_s": round(2 * args.batch / bare_t, 1),
               "overhead": round(full / bare_t - 1.0, 4), "loader_workers": workers, "steps_timed": len(times["full"]),
               "channels_last": nhwc,
               "peak_rss_mib": rss.peak_mib}
    if cuda:
        figures["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    emit(figures)


if __name__ == "__main__":
    main()
