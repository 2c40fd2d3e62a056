"""Benchmark the shard pair loader against a loose-file loader (one JPEG per file, the layout the
seed used) over the LFW train pairs, at 0 and 2 DataLoader workers. Prints ONE JSON line.

Both loaders share the decoder (simplejpeg), the augmentation (one draw per pair) and the
batching, so the difference is the I/O: a few sequential tar reads against two open()/read() per
pair. Each is measured "warm" (files in the page cache) and "cold" (both evicted from the page
cache first with posix_fadvise, as for a data set larger than RAM). The loose files are written
once under benchmarks/out/loose/ (not tracked). ``max_speedup_free_shard_io`` is the ceiling this
machine puts on the ratio: pair decode time against two cold loose-file reads.

Usage (after the pack stage): python benchmarks/loader.py [--shards data/shards] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit  # noqa: E402
from pipeline.config import AugmentParams  # noqa: E402
from pipeline.images import decode_rgb  # noqa: E402
from pipeline.pair_loader import make_pair, make_pair_loader  # noqa: E402
from pipeline.tar_chunks import read_chunk  # noqa: E402


class LoosePairs(Dataset):
    """Map-style dataset over loose files <root>/<identity>/<image>.{raw,masked}.jpg."""

    def __init__(self, root: Path, items: list[tuple[str, int]], augment: AugmentParams, seed: int):
        self.root, self.items, self.augment, self.seed = root, items, augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, label = self.items[i]
        raw = (self.root / f"{key}.raw.jpg").read_bytes()
        masked = (self.root / f"{key}.masked.jpg").read_bytes()
        return make_pair(key, raw, masked, label, self.augment, self.seed, 0)


def write_loose(shards: list[Path], root: Path) -> list[tuple[str, int]]:
    if root.exists():
        shutil.rmtree(root)
    items = []
    for shard in shards:
        for key, m in read_chunk(shard):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / f"{key}.raw.jpg").write_bytes(m["raw.jpg"])
            (root / f"{key}.masked.jpg").write_bytes(m["masked.jpg"])
            items.append((key, int(m["cls"])))
    return items


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (posix_fadvise DONTNEED; no root, nothing else
    touched), so the next epoch reads them from disk as a data set larger than RAM would."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> bool:
    """Empty the page, dentry and inode caches when allowed (root): a truly cold start."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ratio_bound(items: list[tuple[str, int]], loose_dir: Path, n: int = 1000) -> dict:
    """What caps the shard/loose ratio on this machine: decoding a pair's two JPEGs (both loaders
    do it) against reading its two loose files from a cold cache (only the loose loader does).
    Even a free shard reader is at most (decode + 2 reads) / decode faster."""
    keys = [k for k, _ in items[:n]]
    files = [loose_dir / f"{k}.{e}.jpg" for k in keys for e in ("raw", "masked")]
    dropped = drop_all_caches()
    if not dropped:
        evict(files)
    t0 = time.perf_counter()
    blobs = [f.read_bytes() for f in files]
    read_us = (time.perf_counter() - t0) / len(files) * 1e6
    t0 = time.perf_counter()
    for b in blobs:
        decode_rgb(b)
    decode_us = (time.perf_counter() - t0) / len(keys) * 1e6
    return {"cold_read_us_per_file": round(read_us, 1), "cold_by": "drop_caches" if dropped else "fadvise",
            "decode_us_per_pair": round(decode_us, 1),
            "max_speedup_free_shard_io": round((decode_us + 2 * read_us) / decode_us, 2)}


def rate(loader, epochs: int) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for raw, _masked, _label in loader:
            n += raw.shape[0]
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loose-dir", default="benchmarks/out/loose")
    args = ap.parse_args()
    torch.set_num_threads(1)
    index = json.loads((Path(args.shards) / "index.json").read_text())
    shards = [Path(args.shards) / s["name"] for s in index["train"]["shards"]]
    items = write_loose(shards, Path(args.loose_dir))
    aug = AugmentParams()
    figures: dict = {"bench": "loader", "pairs": len(items), "shards": len(shards), "batch_size": args.batch_size}
    loose_files = [Path(args.loose_dir) / f"{k}.{e}.jpg" for k, _ in items for e in ("raw", "masked")]
    for cache in ("warm", "cold"):
        for workers in (0, 2):
            tag = f"{cache}_w{workers}"
            if cache == "cold":
                evict(shards)
            with PeakRSS() as rss:
                shard_loader = make_pair_loader(shards, batch_size=args.batch_size, augment=aug, seed=0,
                                                num_workers=workers)
                figures[f"shard_pairs_per_s_{tag}"], _ = rate(shard_loader, args.epochs)
            figures[f"shard_peak_rss_mib_{tag}"] = rss.peak_mib
            if cache == "cold":
                evict(loose_files)
            with PeakRSS() as rss:
                loose = DataLoader(LoosePairs(Path(args.loose_dir), items, aug, 0), batch_size=args.batch_size,
                                   shuffle=True, num_workers=workers, drop_last=True,
                                   generator=torch.Generator().manual_seed(0))
                figures[f"loose_pairs_per_s_{tag}"], _ = rate(loose, args.epochs)
            figures[f"loose_peak_rss_mib_{tag}"] = rss.peak_mib
            figures[f"speedup_{tag}"] = round(figures[f"shard_pairs_per_s_{tag}"]
                                              / figures[f"loose_pairs_per_s_{tag}"], 2)
    figures.update(ratio_bound(items, Path(args.loose_dir)))
    for k in list(figures):
        if "pairs_per_s" in k:
            figures[k] = round(figures[k], 1)
    emit(figures)


if __name__ == "__main__":
    main()
