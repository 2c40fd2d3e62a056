"""Benchmark the shard pair loader against its own ceiling: the same loader on pair bytes already in
memory. Prints ONE JSON line.

Both runs are ``make_pair_loader`` with the same shards, seed, augmentation, shuffle buffer,
batching and workers; only the sample source differs: the tar shards (:func:`shard_samples`, the
default) or :class:`MemorySource`, the same (key, raw bytes, masked bytes, label) tuples read into
memory beforehand (no file or tar I/O at all). So ``ratio_* = shard / ceiling`` is what reading the
tars costs; the target is >= 0.9 at 0 and 2 workers. The shard loader runs "warm" (shards in the
page cache) and "cold" (evicted first with posix_fadvise, as for a data set larger than RAM).

The machine may be busy (rates move with its load): ceiling and shard runs alternate within each
repeat; ``ratio_*`` is the best shard rate over the best ceiling rate (the runs least disturbed),
``cpu_ratio_*`` the median over repeats of ceiling / shard CPU time per pair (this process and its
workers; hardly moved by other load, blind to waiting on the disk); the load average is printed.
``decode_us_per_pair`` is the two JPEG decodes alone (the floor of a pair's cost, one core).
Peak RSS is the process tree's (workers' shared pages counted in each) and includes the in-memory
copy of the shards (``in_memory_mib``), which stays loaded for every run.
``--loose-dir`` adds a loose-file source (two files per pair, written once there), off by default.

Usage (after the pack stage): python benchmarks/loader.py [--shards data/shards] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit  # noqa: E402
from pipeline.config import AugmentParams  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.train.pair_loader import Sample, make_pair_loader, shard_samples  # noqa: E402


class MemorySource:
    """The samples of every shard read into memory once: a worker's shard list -> its samples,
    in shard order, as :func:`shard_samples` gives them, without touching a file."""

    def __init__(self, shards: list[str | Path]):
        self.samples: dict[str, list[Sample]] = {str(s): list(shard_samples([str(s)])) for s in shards}

    def __call__(self, urls: list[str]):
        for url in urls:
            yield from self.samples[url]

    @property
    def nbytes(self) -> int:
        return sum(len(s[1]) + len(s[2]) for v in self.samples.values() for s in v)


class LooseSource:
    """The same samples as loose files ``<root>/<key>.{raw,masked}.jpg`` (two open()/read() per
    pair); the order and labels come from an index made when they were written."""

    def __init__(self, root: Path, index: dict[str, list[tuple[str, int]]]):
        self.root, self.index = root, index

    def __call__(self, urls: list[str]):
        for url in urls:
            for key, label in self.index[url]:
                yield (key, (self.root / f"{key}.raw.jpg").read_bytes(),
                       (self.root / f"{key}.masked.jpg").read_bytes(), label)

    @staticmethod
    def write(shards: list[Path], root: Path) -> "LooseSource":
        if root.exists():
            shutil.rmtree(root)
        index: dict[str, list[tuple[str, int]]] = {}
        for shard in shards:
            index[str(shard)] = []
            for key, raw, masked, label in shard_samples([str(shard)]):
                (root / key).parent.mkdir(parents=True, exist_ok=True)
                (root / f"{key}.raw.jpg").write_bytes(raw)
                (root / f"{key}.masked.jpg").write_bytes(masked)
                index[str(shard)].append((key, label))
        return LooseSource(root, index)

    def files(self) -> list[Path]:
        return [self.root / f"{k}.{e}.jpg" for v in self.index.values() for k, _ in v for e in ("raw", "masked")]


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (posix_fadvise DONTNEED; no root, nothing else
    touched), so the next pass reads them from disk as a data set larger than RAM would."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode_us_per_pair(source: MemorySource, n: int = 1000) -> float:
    pairs = [s for v in source.samples.values() for s in v][:n]
    t0 = time.perf_counter()
    for _, raw, masked, _ in pairs:
        decode_rgb(raw), decode_rgb(masked)
    return (time.perf_counter() - t0) / len(pairs) * 1e6


def rate(loader, epochs: int) -> tuple[float, float]:
    """(pairs per second, CPU microseconds per pair) over ``epochs`` passes of one loader (workers
    persist across them; their start-up counts). CPU: this process and its loader workers."""
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2]) + sum(os.times()[2:4])
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for raw, _masked, _label in loader:
            n += raw.shape[0]
    wall = time.perf_counter() - t0
    cpu = sum(me.cpu_times()[:2]) + sum(os.times()[2:4]) - cpu0  # with workers that ended (reaped)
    for child in me.children(recursive=True):  # the persistent workers, still alive
        try:
            cpu += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return n / wall, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--epochs", type=int, default=1, help="passes per measurement (one loader)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating ceiling/shard rounds")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--loose-dir", default=None, help="also time loose files written here (not the criterion)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    index = json.loads((Path(args.shards) / "index.json").read_text())
    shards = [Path(args.shards) / s["name"] for s in index["train"]["shards"]]
    aug = AugmentParams()
    memory = MemorySource(shards)
    loose = LooseSource.write(shards, Path(args.loose_dir)) if args.loose_dir else None
    figures: dict = {"bench": "loader", "pairs": index["train"]["samples"], "shards": len(shards),
                     "batch_size": args.batch_size, "epochs": args.epochs, "repeats": args.repeats,
                     "in_memory_mib": round(memory.nbytes / 2**20, 1), "cpus": os.cpu_count(),
                     "load_avg_start": round(os.getloadavg()[0], 2),
                     "decode_us_per_pair": round(decode_us_per_pair(memory), 1)}

    def measure(kind: str, workers: int) -> tuple[float, float, float]:
        if kind == "shard_cold":
            evict(shards)
        if kind == "loose_cold":
            evict(loose.files())
        source = {"ceiling": memory, "loose_cold": loose}.get(kind)
        with PeakRSS() as rss:
            loader = make_pair_loader(shards, batch_size=args.batch_size, augment=aug, seed=0,
                                      num_workers=workers, source=source)
            pairs_per_s, cpu_us = rate(loader, args.epochs)
            del loader  # persistent workers end with their loader
        return pairs_per_s, cpu_us, rss.peak_mib

    # warm-up, not timed: first calls into the decoder, OpenCV, torch and the allocator
    for _ in make_pair_loader(shards[:1], batch_size=args.batch_size, augment=aug, seed=0, source=memory):
        pass
    kinds = ["ceiling", "shard_cold", "shard_warm"] + (["loose_cold"] if loose else [])
    for workers in (int(w) for w in args.workers.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(args.repeats):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:  # alternate the order: load drifts
                pairs_per_s, cpu_us, rss_mib = measure(kind, workers)
                runs[kind].append((pairs_per_s, cpu_us))
                key = f"{kind}_peak_rss_mib_w{workers}"
                figures[key] = max(rss_mib, figures.get(key, 0.0))
        for kind in kinds:
            figures[f"{kind}_pairs_per_s_w{workers}"] = round(max(x for x, _ in runs[kind]), 1)
            figures[f"{kind}_pairs_per_s_median_w{workers}"] = round(statistics.median(x for x, _ in runs[kind]), 1)
            figures[f"{kind}_cpu_us_per_pair_w{workers}"] = round(statistics.median(c for _, c in runs[kind]), 1)
        for kind in kinds[1:]:
            figures[f"ratio_{kind}_w{workers}"] = round(figures[f"{kind}_pairs_per_s_w{workers}"]
                                                        / figures[f"ceiling_pairs_per_s_w{workers}"], 3)
            figures[f"ratios_{kind}_w{workers}"] = [round(x / c, 3) for (x, _), (c, _) in zip(runs[kind], runs["ceiling"])]
            figures[f"cpu_ratio_{kind}_w{workers}"] = round(statistics.median(
                c / x for (_, x), (_, c) in zip(runs[kind], runs["ceiling"])), 3)
    figures["ratio_shard_min"] = min(v for k, v in figures.items() if k.startswith("ratio_shard_"))
    figures["cpu_ratio_shard_min"] = min(v for k, v in figures.items() if k.startswith("cpu_ratio_shard_"))
    figures["load_avg_end"] = round(os.getloadavg()[0], 2)
    emit(figures)


if __name__ == "__main__":
    main()
