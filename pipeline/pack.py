"""Pack aligned pairs into WebDataset training shards: few large files, globally shuffled.

Training reads a handful of big tar shards sequentially instead of millions of small files (the
seed could not scale past LFW because of that I/O; DVC also slows to hours past ~200k files).

- ``train-NNNNNN.tar``: train pairs of identities with >= ``min_images_per_identity`` aligned images,
  in one global permutation drawn from ``pack.seed`` over the sorted keys, so the order does not
  depend on chunking or workers. Labels are contiguous ints over the sorted kept identities.
- ``test-NNNNNN.tar``: every aligned test pair, in key order, label -1 (test identities are
  disjoint from the classes; evaluation uses the identity in the json).
- ``classes.json`` (identity -> label) and ``index.json`` (counts, classes, sha256 per shard).

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


class PackError(RuntimeError):
    pass


def _sample_tar_bytes(members: dict[str, bytes]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus data padded to 512
    (member names up to 100 characters; longer ones add a header that the shard cut ignores)."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())


def _final_size(content: int) -> int:
    """File size once closed: two zero end blocks, padded to tarfile's 10240-byte record."""
    return -(-(content + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _iter_aligned(aligned_dir: Path, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    for chunk in list_chunks(aligned_dir / "chunks", prefix=f"{split}-"):
        yield from read_chunk(chunk)


def _pack_members(key: str, members: dict[str, bytes], label: int, meta: dict) -> dict:
    missing = {"raw.jpg", "masked.jpg"} - set(members)
    if missing:
        raise PackError(f"aligned sample {key!r} lacks {sorted(missing)}")
    return {
        "__key__": key,
        "raw.jpg": members["raw.jpg"],
        "masked.jpg": members["masked.jpg"],
        "cls": str(label).encode("ascii"),
        "json": dumps_json({"image_id": meta["image_id"], "identity": meta["identity"],
                            "split": meta["split"], "label": label}),
    }


def _write_shards(samples: Iterable[dict], out_dir: Path, prefix: str, params: PackParams,
                  total: int) -> list[dict]:
    """Cut samples into shards of <= shard_max_count samples and <= shard_max_bytes (a sample
    bigger than the limit gets a shard of its own). Each shard appears atomically."""
    shards: list[dict] = []
    # "bytes" counts the tar content written so far (the writer streams through a buffer, so
    # the file position lags behind).
    state = {"fh": None, "writer": None, "tmp": None, "count": 0, "bytes": 0}

    def close() -> None:
        if state["writer"] is None:
            return
        state["writer"].close()
        state["fh"].close()
        name = f"{prefix}-{len(shards):06d}.tar"
        final = out_dir / name
        os.replace(state["tmp"], final)
        shards.append({"name": name, "samples": state["count"], "bytes": final.stat().st_size,
                       "sha256": file_sha256(final)})
        state.update(fh=None, writer=None, tmp=None, count=0, bytes=0)

    for sample in tqdm(samples, total=total, desc=f"pack {prefix}", unit="pair"):
        size = _sample_tar_bytes({k: v for k, v in sample.items() if k != "__key__"})
        if state["writer"] is not None and (state["count"] >= params.shard_max_count
                                            or _final_size(state["bytes"] + size) > params.shard_max_bytes):
            close()
        if state["writer"] is None:
            state["tmp"] = out_dir / f".{prefix}-{len(shards):06d}.tar.tmp"
            state["fh"] = open(state["tmp"], "wb")
            state["writer"] = wds.TarWriter(state["fh"], user="", group="", mode=0o644,
                                            mtime=FIXED_MTIME, encoder=False)
        state["writer"].write(sample)
        state["count"] += 1
        state["bytes"] += size
    close()
    return shards


def run_pack(*, params: PackParams, aligned_dir: str | Path, out_dir: str | Path) -> dict:
    """aligned chunks -> shards + classes.json + index.json; returns the index."""
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    if not list_chunks(aligned_dir / "chunks"):
        raise PackError(f"{aligned_dir}/chunks holds no aligned chunks: run the align stage first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    # Pass 1: keys, identities and metadata only (small), to filter, label and shuffle.
    meta: dict[str, dict] = {}
    for split in ("train", "test"):
        for key, members in _iter_aligned(aligned_dir, split):
            info = json.loads(members["json"])
            if info.get("split") != split:
                raise PackError(f"{key}: json says split {info.get('split')!r}, chunk says {split!r}")
            meta[key] = info
    train_keys = sorted(k for k, m in meta.items() if m["split"] == "train")
    test_keys = sorted(k for k, m in meta.items() if m["split"] == "test")
    counts = Counter(meta[k]["identity"] for k in train_keys)
    kept_ids = sorted(i for i, c in counts.items() if c >= params.min_images_per_identity)
    classes = {ident: label for label, ident in enumerate(kept_ids)}
    if not classes:
        raise PackError(f"no train identity has >= {params.min_images_per_identity} aligned images")
    kept = [k for k in train_keys if meta[k]["identity"] in classes]
    order = np.random.default_rng(params.seed).permutation(len(kept))
    shuffled = [kept[i] for i in order]

    # Pass 2: train pairs in the global shuffled order. The aligned pairs are small (two 112x112
    # JPEGs, ~8 KB), so holding the kept train pairs in memory is fine up to a few million.
    blobs: dict[str, dict[str, bytes]] = {}
    for key, members in _iter_aligned(aligned_dir, "train"):
        if meta[key]["identity"] in classes:
            blobs[key] = {"raw.jpg": members["raw.jpg"], "masked.jpg": members["masked.jpg"]}
    train_shards = _write_shards(
        (_pack_members(k, blobs.pop(k), classes[meta[k]["identity"]], meta[k]) for k in shuffled),
        out_dir, "train", params, len(shuffled))
    test_shards = _write_shards(
        (_pack_members(k, m, -1, meta[k]) for k, m in _iter_aligned(aligned_dir, "test")),
        out_dir, "test", params, len(test_keys))

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
