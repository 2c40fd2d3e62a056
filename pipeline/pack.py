"""Pack aligned pairs into WebDataset training shards: few large files, globally shuffled.

Training reads a handful of big tar shards sequentially instead of millions of small files (the
seed could not scale past LFW because of that I/O; DVC also slows to hours past ~200k files).

- ``train-NNNNNN.tar``: train pairs of identities with >= ``min_images_per_identity`` aligned images,
  in one global permutation drawn from ``pack.seed`` over the sorted keys, so the order does not
  depend on chunking or workers. Labels are contiguous ints over the sorted kept identities.
- ``test-NNNNNN.tar``: every aligned test pair, in key order, label -1 (test identities are
  disjoint from the classes; evaluation uses the identity in the json).
- ``classes.json`` (identity -> label) and ``index.json`` (counts, classes, sha256 per shard).

Memory stays bounded: a first pass reads metadata and sizes only and plans every shard; shards
are then filled in groups of at most ``PACK_MEMORY_BYTES``, one sequential pass over the aligned
chunks per group.

Members per sample: ``{key}.raw.jpg``, ``{key}.masked.jpg``, ``{key}.cls`` (ascii int),
``{key}.json``. Written through ``webdataset.TarWriter`` with a fixed mtime, empty user/group and
mode 0644, so two runs give byte-identical shards.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.config import PackParams
from pipeline.tar_chunks import FIXED_MTIME, dumps_json, file_sha256, list_chunks, read_chunk, write_json

TAR_BLOCK = 512
# Most sample bytes held in memory at once while writing shards (one pass over the aligned
# chunks per this much data).
PACK_MEMORY_BYTES = 1 << 30


class PackError(RuntimeError):
    pass


def _tar_bytes(sizes: Iterable[int]) -> int:
    """Bytes members of these sizes take in a tar: a 512-byte header each plus data padded to
    512 (member names up to 100 characters; longer ones add a header the shard cut ignores)."""
    return sum(TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK for n in sizes)


def _final_size(content: int) -> int:
    """File size once closed: two zero end blocks, padded to tarfile's 10240-byte record."""
    return -(-(content + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _iter_aligned(aligned_dir: Path, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    for chunk in list_chunks(aligned_dir / "chunks", prefix=f"{split}-"):
        yield from read_chunk(chunk)


def _small_members(meta: dict, label: int) -> dict[str, bytes]:
    return {"cls": str(label).encode("ascii"),
            "json": dumps_json({"image_id": meta["image_id"], "identity": meta["identity"],
                                "split": meta["split"], "label": label})}


def plan_shards(sizes: list[int], params: PackParams) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive samples: <= shard_max_count samples and a final file of
    <= shard_max_bytes (a single sample bigger than that gets a shard of its own)."""
    ranges, start, content = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= params.shard_max_count
                          or _final_size(content + size) > params.shard_max_bytes):
            ranges.append((start, i))
            start, content = i, 0
        content += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def write_shard(path: Path, samples: Iterable[dict]) -> dict:
    """One shard through webdataset's TarWriter with fixed metadata; appears atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "wb") as fh:
        writer = wds.TarWriter(fh, user="", group="", mode=0o644, mtime=FIXED_MTIME, encoder=False)
        for sample in samples:
            writer.write(sample)
            n += 1
        writer.close()
    os.replace(tmp, path)
    return {"name": path.name, "samples": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_split(keys: list[str], meta: dict[str, dict], labels: dict[str, int], aligned_dir: Path,
                 split: str, out_dir: Path, params: PackParams) -> list[dict]:
    """Write ``keys`` (in this order) as shards. Shards are filled in groups of at most
    PACK_MEMORY_BYTES of samples, one sequential pass over the aligned chunks per group, so memory
    stays bounded whatever the data set size."""
    sizes = [meta[k]["_bytes"] for k in keys]
    ranges = plan_shards(sizes, params)
    groups, current, held = [], [], 0
    for r in ranges:
        shard_bytes = sum(sizes[r[0]:r[1]])
        if current and held + shard_bytes > PACK_MEMORY_BYTES:
            groups.append(current)
            current, held = [], 0
        current.append(r)
        held += shard_bytes
    if current:
        groups.append(current)
    shards: list[dict] = []
    bar = tqdm(total=len(keys), desc=f"pack {split}", unit="pair")
    for group in groups:
        wanted = {k for a, b in group for k in keys[a:b]}
        blobs = {k: (m["raw.jpg"], m["masked.jpg"]) for k, m in _iter_aligned(aligned_dir, split) if k in wanted}
        for a, b in group:
            samples = ({"__key__": k, "raw.jpg": blobs[k][0], "masked.jpg": blobs[k][1],
                        **_small_members(meta[k], labels[k])} for k in keys[a:b])
            shards.append(write_shard(out_dir / f"{split}-{len(shards):06d}.tar", samples))
            bar.update(b - a)
    bar.close()
    return shards


def run_pack(*, params: PackParams, aligned_dir: str | Path, out_dir: str | Path) -> dict:
    """aligned chunks -> shards + classes.json + index.json; returns the index."""
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    if not list_chunks(aligned_dir / "chunks"):
        raise PackError(f"{aligned_dir}/chunks holds no aligned chunks: run the align stage first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    # Pass 1: metadata and member sizes only, to filter, label, shuffle and plan the shards.
    meta: dict[str, dict] = {}
    for split in ("train", "test"):
        for key, members in _iter_aligned(aligned_dir, split):
            missing = {"raw.jpg", "masked.jpg", "json"} - set(members)
            if missing:
                raise PackError(f"aligned sample {key!r} lacks {sorted(missing)}")
            info = json.loads(members["json"])
            if info.get("split") != split:
                raise PackError(f"{key}: json says split {info.get('split')!r}, chunk says {split!r}")
            info["_images"] = (len(members["raw.jpg"]), len(members["masked.jpg"]))
            meta[key] = info
    train_keys = sorted(k for k, m in meta.items() if m["split"] == "train")
    test_keys = sorted(k for k, m in meta.items() if m["split"] == "test")
    counts = Counter(meta[k]["identity"] for k in train_keys)
    kept_ids = sorted(i for i, c in counts.items() if c >= params.min_images_per_identity)
    classes = {ident: label for label, ident in enumerate(kept_ids)}
    if not classes:
        raise PackError(f"no train identity has >= {params.min_images_per_identity} aligned images")
    kept = [k for k in train_keys if meta[k]["identity"] in classes]
    shuffled = [kept[i] for i in np.random.default_rng(params.seed).permutation(len(kept))]
    labels = {k: classes[meta[k]["identity"]] for k in kept} | {k: -1 for k in test_keys}
    for k, label in labels.items():
        small = _small_members(meta[k], label)
        meta[k]["_bytes"] = _tar_bytes([*meta[k]["_images"], *map(len, small.values())])

    # Pass 2: train shards in the global shuffled order; test shards in key order.
    train_shards = _write_split(shuffled, meta, labels, aligned_dir, "train", out_dir, params)
    test_shards = _write_split(test_keys, meta, labels, aligned_dir, "test", out_dir, params)

    n_train_written = sum(s["samples"] for s in train_shards)
    n_test_written = sum(s["samples"] for s in test_shards)
    dropped = len(train_keys) - len(kept)
    if n_train_written + dropped != len(train_keys) or n_test_written != len(test_keys):
        raise PackError("pack lost samples: written + filtered != aligned")
    write_json(out_dir / "classes.json", classes)
    index = {
        "params": params.model_dump(),
        "classes": len(classes),
        "train": {"aligned": len(train_keys), "samples": n_train_written, "identities": len(classes),
                  "filtered_images": dropped, "filtered_identities": len(counts) - len(classes),
                  "shards": train_shards},
        "test": {"samples": n_test_written,
                 "identities": len({meta[k]["identity"] for k in test_keys}), "shards": test_shards},
    }
    write_json(out_dir / "index.json", index)
    return index
