"""Pack aligned pairs into WebDataset training shards: few large files, globally shuffled.

Training reads a handful of big tar shards sequentially instead of millions of small files (the
seed could not scale past LFW because of that I/O; DVC also slows to hours past ~200k files).

- Train identities with >= ``min_images_per_identity`` aligned images are kept; a seeded share of
  them (``val_fraction``, at most ``val_max_identities``) is held out for model selection, so the
  split is part of the cached data set and training never has to filter it.
- ``train-NNNNNN.tar``: the other kept identities' pairs, in one global permutation drawn from
  ``pack.seed`` over the sorted keys (independent of chunking or workers). Labels are contiguous
  ints over the sorted training identities (``classes.json``).
- ``val-NNNNNN.tar``: the held-out identities' pairs (the first ``val_images_per_identity`` of each
  in key order), in key order; their label is the identity's index in ``index.json``'s
  ``val.identities``.
- ``index.json``: counts, the val identities, sha256 per shard.
The test split is not packed: evaluation reads the aligned test chunks with their protocol.

Memory stays bounded: a first pass reads metadata and sizes only and plans every shard; shards
are then filled in groups of at most ``PACK_MEMORY_BYTES``, one sequential pass over the aligned
chunks per group.

Members per sample: ``{key}.raw.jpg``, ``{key}.masked.jpg``, ``{key}.cls`` (ascii int),
``{key}.json``, written by :func:`pipeline.tar_chunks.write_tar` (GNU long names, fixed metadata),
so two runs give byte-identical shards whatever the key length.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline.config import PackParams
from pipeline.tar_chunks import (dumps_json, file_sha256, list_chunks, member_bytes, read_chunk,
                                 tar_file_size, write_json, write_tar)

# Most sample bytes held in memory at once while writing shards (one pass over the aligned
# chunks per this much data).
PACK_MEMORY_BYTES = 1 << 30
IMAGE_MEMBERS = ("raw.jpg", "masked.jpg")


class PackError(RuntimeError):
    pass


def _iter_aligned(aligned_dir: Path, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    for chunk in list_chunks(aligned_dir / "chunks", prefix=f"{split}-"):
        yield from read_chunk(chunk)


def _small_members(meta: dict, label: int, split: str) -> dict[str, bytes]:
    return {"cls": str(label).encode("ascii"),
            "json": dumps_json({"image_id": meta["image_id"], "identity": meta["identity"],
                                "split": split, "label": label})}


def sample_bytes(key: str, sizes: dict[str, int]) -> int:
    """Bytes one sample takes in a shard (members named ``{key}.{ext}`` of these sizes)."""
    return sum(member_bytes(f"{key}.{ext}", n) for ext, n in sizes.items())


def plan_shards(sizes: list[int], params: PackParams) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive samples: <= shard_max_count samples and a final file of
    <= shard_max_bytes (a single sample bigger than that gets a shard of its own)."""
    ranges, start, content = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= params.shard_max_count
                          or tar_file_size(content + size) > params.shard_max_bytes):
            ranges.append((start, i))
            start, content = i, 0
        content += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def split_val_identities(identities: list[str], params: PackParams) -> list[str]:
    """The held-out validation identities: a seeded choice among the sorted names."""
    if params.val_fraction <= 0:
        return []
    names = sorted(identities)
    n_val = max(2, min(int(round(params.val_fraction * len(names))), params.val_max_identities))
    if n_val >= len(names):
        raise PackError(f"pack.val_fraction={params.val_fraction} leaves no training identities "
                        f"({len(names)} in all)")
    rng = np.random.default_rng([params.seed, 1])
    return sorted(names[i] for i in rng.permutation(len(names))[:n_val])


def _write_shards(prefix: str, keys: list[str], meta: dict[str, dict], labels: dict[str, int],
                  aligned_dir: Path, out_dir: Path, params: PackParams) -> list[dict]:
    """Write ``keys`` (in this order) as ``{prefix}-NNNNNN.tar``. Shards are filled in groups of at
    most PACK_MEMORY_BYTES of samples, one sequential pass over the aligned train chunks per group,
    so memory stays bounded whatever the data set size."""
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
    bar = tqdm(total=len(keys), desc=f"pack {prefix}", unit="pair")
    for group in groups:
        wanted = {k for a, b in group for k in keys[a:b]}
        blobs = {k: {e: m[e] for e in IMAGE_MEMBERS} for k, m in _iter_aligned(aligned_dir, "train")
                 if k in wanted}
        for a, b in group:
            path = out_dir / f"{prefix}-{len(shards):06d}.tar"
            n = write_tar(path, ((k, {**blobs[k], **_small_members(meta[k], labels[k], prefix)})
                                 for k in keys[a:b]))
            shards.append({"name": path.name, "samples": n, "bytes": path.stat().st_size,
                           "sha256": file_sha256(path)})
            bar.update(b - a)
    bar.close()
    return shards


def run_pack(*, params: PackParams, aligned_dir: str | Path, out_dir: str | Path) -> dict:
    """aligned train chunks -> train/val shards + classes.json + index.json; returns the index."""
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    if not list_chunks(aligned_dir / "chunks", prefix="train-"):
        raise PackError(f"{aligned_dir}/chunks holds no aligned train chunks: run the align stage first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    # Pass 1: metadata and member sizes only, to filter, split, label, shuffle and plan the shards.
    meta: dict[str, dict] = {}
    for key, members in _iter_aligned(aligned_dir, "train"):
        missing = {*IMAGE_MEMBERS, "json"} - set(members)
        if missing:
            raise PackError(f"aligned sample {key!r} lacks {sorted(missing)}")
        info = json.loads(members["json"])
        if info.get("split") != "train":
            raise PackError(f"{key}: json says split {info.get('split')!r}, chunk says 'train'")
        info["_sizes"] = {e: len(members[e]) for e in IMAGE_MEMBERS}
        meta[key] = info
    aligned_keys = sorted(meta)
    counts = Counter(meta[k]["identity"] for k in aligned_keys)
    kept_ids = sorted(i for i, c in counts.items() if c >= params.min_images_per_identity)
    if not kept_ids:
        raise PackError(f"no train identity has >= {params.min_images_per_identity} aligned images")
    val_ids = split_val_identities(kept_ids, params)
    val_set = set(val_ids)
    classes = {ident: label for label, ident in enumerate(i for i in kept_ids if i not in val_set)}
    by_id: dict[str, list[str]] = defaultdict(list)
    for k in aligned_keys:
        by_id[meta[k]["identity"]].append(k)
    val_keys = [k for ident in val_ids for k in by_id[ident][:params.val_images_per_identity]]
    train_keys = [k for k in aligned_keys if meta[k]["identity"] in classes]
    shuffled = [train_keys[i] for i in np.random.default_rng(params.seed).permutation(len(train_keys))]
    val_label = {ident: i for i, ident in enumerate(val_ids)}
    labels = ({k: classes[meta[k]["identity"]] for k in train_keys}
              | {k: val_label[meta[k]["identity"]] for k in val_keys})
    for k, label in labels.items():
        split = "val" if meta[k]["identity"] in val_set else "train"
        small = _small_members(meta[k], label, split)
        meta[k]["_bytes"] = sample_bytes(k, {**meta[k]["_sizes"], **{e: len(v) for e, v in small.items()}})

    # Pass 2: train shards in the global shuffled order; val shards in key order.
    train_shards = _write_shards("train", shuffled, meta, labels, aligned_dir, out_dir, params)
    val_shards = _write_shards("val", val_keys, meta, labels, aligned_dir, out_dir, params) if val_keys else []

    n_train = sum(s["samples"] for s in train_shards)
    n_val = sum(s["samples"] for s in val_shards)
    filtered = len(aligned_keys) - sum(counts[i] for i in kept_ids)
    val_unused = sum(counts[i] for i in val_ids) - len(val_keys)
    if n_train + n_val + filtered + val_unused != len(aligned_keys):
        raise PackError("pack lost samples: train + val + filtered + unused val images != aligned")
    write_json(out_dir / "classes.json", classes)
    index = {
        "params": params.model_dump(),
        "classes": len(classes),
        "aligned": len(aligned_keys),
        "filtered": {"images": filtered, "identities": len(counts) - len(kept_ids),
                     "reason": f"identity with < {params.min_images_per_identity} aligned images"},
        "train": {"samples": n_train, "identities": len(classes), "shards": train_shards},
        "val": {"samples": n_val, "identities": val_ids, "images_not_packed": val_unused,
                "shards": val_shards},
    }
    write_json(out_dir / "index.json", index)
    return index
