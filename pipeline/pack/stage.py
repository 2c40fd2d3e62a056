"""Pack aligned pairs into WebDataset training shards: few large files, shuffled.

Training reads a handful of big tar shards sequentially instead of millions of small files (the
seed could not scale past LFW because of that I/O; DVC also slows to hours past ~200k files).

- Train identities with >= ``min_images_per_identity`` aligned images are kept; a seeded share of
  those with >= 2 images (``val_fraction``, at most ``val_max_identities``) is held out for every
  choice made on validation (:mod:`pipeline.evaluate.validation`), so the split is part of the cached data
  set and training never has to filter it.
- ``unseen_mask_types``: a training person's pairs whose twin wears one of these types (the mask
  stage's status.parquet says which) are not packed, so evaluation can tell mask types the model
  trained on from ones it never saw; validation people keep every type. A person left with no
  pair becomes no class. ``index.json``'s ``held_out_mask_types`` counts them.
- ``max_train_pairs``: of the pairs left to train on, a seeded choice of at most this many is
  packed (recipes compared at one number of pairs); ``index.json``'s ``subsampled`` counts the rest.
- ``train-NNNNNN.tar``: the other kept identities' pairs, shuffled in one pass through seeded
  buckets (below). Labels are contiguous ints over the sorted training identities
  (``classes.json``).
- ``val-NNNNNN.tar``: the held-out identities' pairs (the first ``val_images_per_identity`` of each
  in key order), by identity then key; their label is the identity's index in ``index.json``'s
  ``val.identities``.
- ``index.json``: counts, the crop template, the val identities, the number of shuffle buckets, sha256 per shard.
The test split is not packed: evaluation reads the aligned test chunks with their protocol.

How, in bounded memory and linear time (every pass runs chunk-parallel through
:func:`pipeline.parallel.iter_chunks`; a task carries its own chunk's names, never the data set's):

1. Scan: every aligned train chunk's json members give identity counts and bytes; the parent keeps
   O(identities): counts, which identities each chunk holds, the val split and the labels.
2. Scatter (the one pass over the image bytes): each kept pair goes to bucket
   ``seed_for(pack.seed, "bucket", key) % n_buckets`` and is written, with its final ``cls`` and
   ``json`` members, to a temporary tar fragment per (bucket, chunk); a held-out identity's first
   ``val_images_per_identity`` keys of the chunk go to a val fragment. ``n_buckets`` comes from the
   train pairs' bytes (about ``BUCKET_BYTES`` each), so it depends on the data only.
3. Gather, buckets in parallel: a bucket's pairs, sorted by key, are put in the order of the
   permutation ``item_rng(pack.seed, "bucket", b)`` and cut into shards of <= ``shard_max_bytes``
   and <= ``shard_max_count``; a writer holds at most ``PACK_MEMORY_BYTES`` of samples (a bigger
   bucket is read again per group of shards). Train shards are numbered bucket by bucket. The
   val shards' keys are known by then (the first ones of each identity over all chunks), so each
   val shard is one task reading the fragments that hold its keys.

The train order is thus bucket 0's permutation, then bucket 1's, ...: a uniform shuffle (each pair's
bucket and place in it are random), a function of ``pack.seed`` and the keys only, so shards are
byte-identical across runs, worker counts and ``PACK_MEMORY_BYTES``. The temporary fragments are
deleted at the end.

Members per sample: ``{key}.raw.jpg``, ``{key}.masked.jpg``, ``{key}.cls`` (ascii int),
``{key}.json`` (a train pair also ``{key}.masked_standalone.jpg`` where align wrote it), written by :func:`pipeline.data.tar_chunks.write_tar` (GNU long names, fixed metadata),
so two runs give byte-identical shards whatever the key length.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.align.geometry import LEGACY_TEMPLATE, STANDALONE_TWIN
from pipeline.config import ComputeParams, PackParams
from pipeline.mask.records import MaskRecordError, read_mask_types
from pipeline.parallel import iter_chunks
from pipeline.seeding import item_rng, seed_for
from pipeline.pack.shards import CLASSES_FILE, INDEX_FILE, TRAIN_PREFIX, VAL_PREFIX
from pipeline.data.tar_chunks import (dumps_json, file_sha256, list_chunks, member_bytes, read_chunk,
                                      record_chunks, tar_file_size, write_chunk, write_json, write_tar)

# Most sample bytes a shard writer holds in memory at once (a bigger bucket is read once per group
# of shards of at most this size). Does not change the output.
PACK_MEMORY_BYTES = 1 << 30
# Sample bytes per shuffle bucket, about: sets the number of buckets (part of the train order).
BUCKET_BYTES = 128 << 20
IMAGE_MEMBERS = ("raw.jpg", "masked.jpg")
SMALL_MEMBERS_BYTES = 2 * 512 + 2 * 512  # headers + padded data of the cls and json members, about
FRAGMENTS = ".fragments"  # temporary folder inside out_dir


class PackError(RuntimeError):
    pass


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


def split_val_identities(counts: dict[str, int], params: PackParams) -> list[str]:
    """The held-out validation identities: a seeded choice among the sorted names of the people
    with >= 2 aligned images (``counts``: identity -> images), ``val_fraction`` of them, at most
    ``val_max_identities``; people with one image give validation no same pair and stay in training."""
    if params.val_fraction <= 0:
        return []
    names = sorted(i for i, n in counts.items() if n >= 2)
    n_val = max(2, min(int(round(params.val_fraction * len(names))), params.val_max_identities))
    if n_val >= len(names):
        raise PackError(f"pack.val_fraction={params.val_fraction} holds out {n_val} of the {len(names)} train "
                        f"people with >= 2 images: none would be left to train on (lower it, or 0 for no validation)")
    rng = np.random.default_rng([params.seed, 1])
    return sorted(names[i] for i in rng.permutation(len(names))[:n_val])


def bucket_of(seed: int, key: str, n_buckets: int) -> int:
    """The shuffle bucket of a train pair: a function of (seed, key) only."""
    return seed_for(seed, "bucket", key) % n_buckets


def bucket_order(seed: int, bucket: int, keys: list[str]) -> list[str]:
    """A bucket's pairs in shard order: a seeded permutation of its sorted keys."""
    keys = sorted(keys)
    return [keys[i] for i in item_rng(seed, "bucket", bucket).permutation(len(keys))]


# ------------------------------------------------------------------ pass 1: scan (json members)

def scan_chunk(job: tuple[str, frozenset[str]]) -> tuple[dict[str, list[int]], list[str]]:
    """(identity -> [aligned pairs, image bytes, pairs of an unseen mask type, their bytes], crop
    templates found) of one aligned train chunk; ``job``: (chunk path, ids of its unseen-type
    pairs). Checked: every sample has both twins and a json saying split train."""
    chunk, unseen = job
    out: dict[str, list[int]] = {}
    templates: set[str] = set()
    for key, members in read_chunk(chunk):
        missing = {*IMAGE_MEMBERS, "json"} - set(members)
        if missing:
            raise PackError(f"aligned sample {key!r} lacks {sorted(missing)}")
        info = json.loads(members["json"])
        if info.get("split") != "train":
            raise PackError(f"{key}: json says split {info.get('split')!r}, chunk says 'train'")
        entry = out.setdefault(info["identity"], [0, 0, 0, 0])
        size = sum(len(members[e]) for e in IMAGE_MEMBERS)
        held = info.get("image_id", key) in unseen
        entry[0] += 1
        entry[1] += size
        entry[2] += held
        entry[3] += size * held
        templates.add(info.get("template", LEGACY_TEMPLATE))
    return out, sorted(templates)


# ---------------------------------------------------------------- pass 2: scatter into buckets

def scatter_chunk(job: tuple[str, dict[str, int], dict[str, int], frozenset[str]], *, frag_dir: str, seed: int,
                  n_buckets: int, val_per_identity: int) -> dict:
    """Write one aligned chunk's kept pairs to bucket fragments ``train/<bucket>/<chunk>.tar``
    and its held-out identities' first keys to ``val/<chunk>.tar``. ``job``: (chunk path, train
    identity -> label, val identity -> label, ids of the unseen-type pairs), for this chunk only.
    A train pair carries its masked twin aligned on its own (``masked_standalone.jpg``) when the
    align stage wrote one; a val pair never does (validation scores the pair's crops).
    Returns {"buckets": {bucket: pairs}, "val": [(identity, key, sample bytes)], "standalone_twins": n}."""
    chunk, labels, val_labels, unseen = job
    name = Path(chunk).stem
    buckets: dict[int, list] = {}
    val: dict[str, list] = {}
    own_twins = 0
    for key, members in read_chunk(chunk):
        info = json.loads(members["json"])
        identity = info["identity"]
        if identity in labels:
            if info.get("image_id", key) in unseen:
                continue
            sample = {**{e: members[e] for e in (*IMAGE_MEMBERS, STANDALONE_TWIN) if e in members},
                      **_small_members(info, labels[identity], "train")}
            buckets.setdefault(bucket_of(seed, key, n_buckets), []).append((key, sample))
            own_twins += STANDALONE_TWIN in members
        elif identity in val_labels:
            sample = {**{e: members[e] for e in IMAGE_MEMBERS}, **_small_members(info, val_labels[identity], "val")}
            val.setdefault(identity, []).append((key, sample))
    for b, samples in buckets.items():
        write_chunk(Path(frag_dir) / "train" / f"{b:06d}" / f"{name}.tar", samples)
    candidates, val_samples = [], []
    for identity, samples in val.items():  # the chunk's first keys: the identity's first ones are among them
        for key, sample in sorted(samples, key=lambda s: s[0])[:val_per_identity]:
            candidates.append((identity, key, sample_bytes(key, {e: len(v) for e, v in sample.items()})))
            val_samples.append((key, sample))
    if val_samples:
        write_chunk(Path(frag_dir) / "val" / f"{name}.tar", val_samples)
    return {"buckets": {b: len(s) for b, s in buckets.items()}, "val": candidates, "standalone_twins": own_twins}


# ------------------------------------------------------------------- pass 3: gather into shards

def _memory_groups(ranges: list[tuple[int, int]], sizes: list[int], memory_bytes: int) -> list[list[tuple[int, int]]]:
    """Consecutive shards grouped so a group's samples take at most ``memory_bytes`` (a single
    bigger shard is a group of its own)."""
    groups, current, held = [], [], 0
    for a, b in ranges:
        shard_bytes = sum(sizes[a:b])
        if current and held + shard_bytes > memory_bytes:
            groups.append(current)
            current, held = [], 0
        current.append((a, b))
        held += shard_bytes
    if current:
        groups.append(current)
    return groups


def _write_shard(path: Path, samples) -> dict:
    n = write_tar(path, samples)
    return {"name": path.name, "samples": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def gather_bucket(bucket: int, *, frag_dir: str, params: PackParams, memory_bytes: int) -> list[dict]:
    """Shuffle one bucket (its fragments, any number) and cut it into shards
    ``shards/train-<bucket>-<n>.tar`` under frag_dir; returns them in order."""
    frags = sorted((Path(frag_dir) / "train" / f"{bucket:06d}").glob("*.tar"))
    sizes: dict[str, int] = {}
    blobs: dict[str, dict[str, bytes]] | None = {}
    held = 0
    for frag in frags:
        for key, members in read_chunk(frag):
            if key in sizes:
                raise PackError(f"aligned sample key {key!r} occurs twice")
            sizes[key] = sample_bytes(key, {e: len(v) for e, v in members.items()})
            if blobs is not None:
                held += sizes[key]
                if held > memory_bytes:
                    blobs = None  # too big to hold: read again per group of shards below
                else:
                    blobs[key] = members
    order = bucket_order(params.seed, bucket, list(sizes))
    order_sizes = [sizes[k] for k in order]
    ranges = plan_shards(order_sizes, params)
    out = Path(frag_dir) / "shards"
    shards: list[dict] = []
    for group in ([ranges] if blobs is not None else _memory_groups(ranges, order_sizes, memory_bytes)):
        data = blobs
        if data is None:
            wanted = {k for a, b in group for k in order[a:b]}
            data = {k: m for frag in frags for k, m in read_chunk(frag) if k in wanted}
        for a, b in group:
            shards.append(_write_shard(out / f"{TRAIN_PREFIX}{bucket:06d}-{len(shards):06d}.tar",
                                       ((k, data[k]) for k in order[a:b])))
    return shards


def gather_val_shard(job: tuple[str, list[tuple[str, list[str]]]], *, out_dir: str) -> dict:
    """One val shard: ``job`` = (shard name, [(fragment, its keys in this shard)]), keys in shard
    order across the fragments."""
    name, parts = job
    order = [k for _, keys in parts for k in keys]
    wanted = set(order)
    data = {k: m for frag in dict.fromkeys(f for f, _ in parts) for k, m in read_chunk(frag) if k in wanted}
    return _write_shard(Path(out_dir) / name, ((k, data[k]) for k in order))


def _gather(job: tuple, *, frag_dir: str, out_dir: str, params: PackParams, memory_bytes: int):
    """One gather task: ("train", bucket) or ("val", val shard job)."""
    if job[0] == "train":
        return gather_bucket(job[1], frag_dir=frag_dir, params=params, memory_bytes=memory_bytes)
    return gather_val_shard(job[1], out_dir=out_dir)


def _val_shard_jobs(candidates: dict[str, list[tuple[str, int, str]]], val_ids: list[str], frag_dir: Path,
                    params: PackParams) -> tuple[list[tuple[str, list[tuple[str, list[str]]]]], int]:
    """Val shards over the held-out identities' first keys (by identity, then key): one job each,
    naming the fragments that hold its keys. Returns (jobs, val samples)."""
    entries = [(key, size, chunk) for ident in val_ids
               for key, size, chunk in sorted(candidates.get(ident, []))[:params.val_images_per_identity]]
    jobs = []
    for n, (a, b) in enumerate(plan_shards([size for _, size, _ in entries], params)):
        parts: list[tuple[str, list[str]]] = []
        for key, _, chunk in entries[a:b]:
            frag = str(frag_dir / "val" / f"{chunk}.tar")
            if parts and parts[-1][0] == frag:
                parts[-1][1].append(key)
            else:
                parts.append((frag, [key]))
        jobs.append((f"{VAL_PREFIX}{n:06d}.tar", parts))
    return jobs, len(entries)


def read_overlap(path: str | Path | None) -> dict:
    """The overlap stage's finding (:mod:`pipeline.evaluate.overlap`); none checked when there is no file."""
    if path is None or not Path(path).is_file():
        return {"checked": 0, "reason": "no overlap file", "action": "drop", "matches": 0, "matched": []}
    return json.loads(Path(path).read_text())


def unseen_ids_by_chunk(aligned_dir: Path, masked_dir: Path, unseen_types: list[str]) -> dict[str, frozenset[str]]:
    """aligned chunk name -> ids of its train pairs whose mask type is in ``unseen_types``."""
    if not unseen_types:
        return {}
    try:
        types = read_mask_types(masked_dir)
    except MaskRecordError as e:
        raise PackError(str(e)) from e
    status = aligned_dir / "status.parquet"
    if not status.is_file():
        raise PackError(f"{status} not found: run the align stage")
    t = pq.read_table(status, columns=["image_id", "split", "status", "chunk"]).to_pydict()
    out: dict[str, set[str]] = {}
    for image_id, split, state, chunk in zip(t["image_id"], t["split"], t["status"], t["chunk"]):
        if split != "train" or state != "aligned":
            continue
        if image_id not in types:
            raise PackError(f"{image_id} is aligned but {masked_dir}/status.parquet records no mask type for it")
        if types[image_id] in unseen_types:
            out.setdefault(chunk, set()).add(image_id)
    return {c: frozenset(v) for c, v in out.items()}


def subsample_ids_by_chunk(aligned_dir: Path, train_ids: set[str], held: dict[str, frozenset[str]], keep: int,
                           seed: int) -> tuple[dict[str, frozenset[str]], Counter]:
    """``pack.max_train_pairs``: (aligned chunk name -> ids of the train pairs left out, identity ->
    pairs left out) so that ``keep`` pairs remain of those of ``train_ids`` not already ``held``
    out. The pairs kept are the ``keep`` lowest by ``seed_for(seed, "subsample", image_id)``: a
    function of the seed and the ids only, so the same pairs whatever the chunks or workers."""
    t = pq.read_table(aligned_dir / "status.parquet",
                      columns=["image_id", "identity", "split", "status", "chunk"]).to_pydict()
    pairs = sorted((seed_for(seed, "subsample", i), i, ident, c)
                   for i, ident, split, state, c in zip(t["image_id"], t["identity"], t["split"], t["status"], t["chunk"])
                   if split == "train" and state == "aligned" and ident in train_ids and i not in held.get(c, ()))
    out: dict[str, set[str]] = {}
    per_identity: Counter = Counter()
    for _, image_id, identity, chunk in pairs[keep:]:
        out.setdefault(chunk, set()).add(image_id)
        per_identity[identity] += 1
    return {c: frozenset(v) for c, v in out.items()}, per_identity


def run_pack(*, params: PackParams, aligned_dir: str | Path, out_dir: str | Path,
             compute: ComputeParams | None = None, masked_dir: str | Path | None = None,
             overlap: dict | None = None) -> dict:
    """aligned train chunks -> train/val shards + classes.json + index.json; returns the index.
    ``compute``: workers for the three chunk-parallel passes (default: this process only);
    ``masked_dir``: the mask stage's output, for ``params.unseen_mask_types`` (default: the
    aligned folder's sibling ``masked``, the stages' layout data/<set>/{masked,aligned});
    ``overlap``: the overlap stage's finding (:mod:`pipeline.evaluate.overlap`): its matched people are left
    out, or the pack refused, as its ``action`` says."""
    compute = compute or ComputeParams(n_jobs=1)
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    masked_dir = Path(masked_dir) if masked_dir is not None else aligned_dir.parent / "masked"
    chunks = list_chunks(aligned_dir / "chunks", prefix="train-")
    if not chunks:
        raise PackError(f"{aligned_dir}/chunks holds no aligned train chunks: run the align stage first")
    unseen = unseen_ids_by_chunk(aligned_dir, masked_dir, params.unseen_mask_types)
    chunk_unseen = [unseen.get(c.name, frozenset()) for c in chunks]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    frag_dir = out_dir / FRAGMENTS

    # Pass 1: identity counts and bytes, and which identities each chunk holds: O(identities).
    counts: Counter = Counter()
    image_bytes: Counter = Counter()
    unseen_counts: Counter = Counter()
    unseen_bytes: Counter = Counter()
    chunk_ids: list[list[str]] = []
    names: dict[str, str] = {}  # one string per identity, shared by every chunk's list
    templates: set[str] = set()
    with closing(iter_chunks(scan_chunk, [(str(c), u) for c, u in zip(chunks, chunk_unseen)], compute,
                             desc="pack scan")) as scans:
        for found, chunk_templates in scans:
            templates.update(chunk_templates)
            chunk_ids.append([names.setdefault(i, i) for i in sorted(found)])
            for identity, (n, size, n_unseen, size_unseen) in found.items():
                counts[identity] += n
                image_bytes[identity] += size
                unseen_counts[identity] += n_unseen
                unseen_bytes[identity] += size_unseen
    if sum(unseen_counts.values()) != sum(len(u) for u in chunk_unseen):
        raise PackError(f"{aligned_dir}/status.parquet and the aligned chunks disagree on which pairs are there")
    if len(templates) != 1:
        raise PackError(f"{aligned_dir}: crops on {len(templates)} templates {sorted(templates)}; one model "
                        f"trains on one crop layout: rerun the align stage")
    n_aligned = sum(counts.values())
    kept_ids = sorted(i for i, c in counts.items() if c >= params.min_images_per_identity)
    matched = {m["train_identity"] for m in (overlap or {}).get("matched", [])}
    if overlap and overlap.get("action") == "keep":
        matched = set()  # kept knowingly: overlap.json and metrics.json still list them
    if matched and overlap.get("action") == "refuse":
        raise PackError(f"{len(matched)} training identities are LFW people by face (overlap.action refuse): "
                        + ", ".join(f"{m['train_identity']} ~ {m['lfw_identity']} ({m['score']:.3f})"
                                    for m in overlap["matched"][:10]))
    overlap_images = sum(counts[i] for i in kept_ids if i in matched)
    overlap_ids = [i for i in kept_ids if i in matched]
    kept_ids = [i for i in kept_ids if i not in matched]
    if not kept_ids:
        raise PackError(f"no train identity has >= {params.min_images_per_identity} aligned images")
    val_ids = split_val_identities({i: counts[i] for i in kept_ids}, params)
    val_label = {ident: i for i, ident in enumerate(val_ids)}
    train_ids = [i for i in kept_ids if i not in val_label]
    held_out = sum(unseen_counts[i] for i in train_ids)
    seen_pairs = sum(counts[i] - unseen_counts[i] for i in train_ids)
    seen_bytes = sum(image_bytes[i] - unseen_bytes[i] for i in train_ids) + SMALL_MEMBERS_BYTES * seen_pairs
    dropped: Counter = Counter()
    if params.max_train_pairs is not None and seen_pairs > params.max_train_pairs:
        left_out, dropped = subsample_ids_by_chunk(aligned_dir, set(train_ids), unseen, params.max_train_pairs,
                                                   params.seed)
        chunk_unseen = [u | left_out.get(c.name, frozenset()) for c, u in zip(chunks, chunk_unseen)]
    classes = {ident: label for label, ident in
               enumerate(i for i in train_ids if counts[i] > unseen_counts[i] + dropped[i])}
    train_pairs = sum(counts[i] - unseen_counts[i] - dropped[i] for i in classes)
    subsampled = sum(dropped.values())
    # the shuffle's bucket count from the train pairs' bytes (pro rata after a subsample)
    train_bytes = seen_bytes * train_pairs // max(seen_pairs, 1)
    n_buckets = max(1, math.ceil(train_bytes / BUCKET_BYTES))

    # Pass 2: every kept pair to its bucket's fragment; val candidates to val fragments.
    jobs = [(str(c), {i: classes[i] for i in ids if i in classes}, {i: val_label[i] for i in ids if i in val_label}, u)
            for c, ids, u in zip(chunks, chunk_ids, chunk_unseen)]
    bucket_pairs: Counter = Counter()
    own_twins = 0
    candidates: dict[str, list[tuple[str, int, str]]] = {}
    k = params.val_images_per_identity
    with closing(iter_chunks(scatter_chunk, jobs, compute, desc="pack scatter", frag_dir=str(frag_dir),
                             seed=params.seed, n_buckets=n_buckets, val_per_identity=k)) as scattered:
        for chunk, res in zip(chunks, scattered):
            bucket_pairs.update(res["buckets"])
            own_twins += res["standalone_twins"]
            for identity, key, size in res["val"]:  # keep each identity's first k keys so far
                keep = candidates.setdefault(identity, [])
                keep.append((key, size, chunk.stem))
                if len(keep) > 2 * k:
                    keep.sort()
                    del keep[k:]
    del jobs, chunk_ids
    if sum(bucket_pairs.values()) != train_pairs:
        raise PackError(f"pack lost samples: {sum(bucket_pairs.values())} pairs in buckets, {train_pairs} to train on")

    # Pass 3: buckets shuffled and cut into shards, val shards, all in parallel.
    val_jobs, n_val_keys = _val_shard_jobs(candidates, val_ids, frag_dir, params)
    (frag_dir / "shards").mkdir(parents=True, exist_ok=True)
    tasks = [("train", b) for b in sorted(bucket_pairs)] + [("val", j) for j in val_jobs]
    train_shards: list[dict] = []
    val_shards: list[dict] = []
    with closing(iter_chunks(_gather, tasks, compute, desc="pack shards", frag_dir=str(frag_dir),
                             out_dir=str(out_dir), params=params, memory_bytes=PACK_MEMORY_BYTES)) as gathered:
        for task, res in zip(tasks, gathered):
            if task[0] == "val":
                val_shards.append(res)
                continue
            for shard in res:  # numbered bucket by bucket
                name = f"{TRAIN_PREFIX}{len(train_shards):06d}.tar"
                os.replace(frag_dir / "shards" / shard["name"], out_dir / name)
                train_shards.append({**shard, "name": name})
    shutil.rmtree(frag_dir)

    n_train = sum(s["samples"] for s in train_shards)
    n_val = sum(s["samples"] for s in val_shards)
    filtered = n_aligned - sum(counts[i] for i in kept_ids) - overlap_images
    val_unused = sum(counts[i] for i in val_ids) - n_val_keys
    if n_train != train_pairs or \
            n_train + n_val + filtered + val_unused + held_out + subsampled + overlap_images != n_aligned:
        raise PackError("pack lost samples: train + val + filtered + unused val images + unseen mask types "
                        "+ subsampled != aligned")
    record_chunks(out_dir, train_shards + val_shards)
    write_json(out_dir / CLASSES_FILE, classes)
    index = {
        "params": params.model_dump(),
        "template": templates.pop(),
        "classes": len(classes),
        "aligned": n_aligned,
        "filtered": {"images": filtered, "identities": len(counts) - len(kept_ids) - len(overlap_ids),
                     "reason": f"identity with < {params.min_images_per_identity} aligned images"},
        "held_out_mask_types": {"types": params.unseen_mask_types, "images": held_out,
                                "identities_without_a_seen_pair": len(train_ids) - len(classes),
                                "reason": "a training pair whose twin wears an unseen mask type"},
        "subsampled": {"images": subsampled, "identities_without_a_pair": sum(
                           1 for i in train_ids if counts[i] > unseen_counts[i] and i not in classes),
                       "reason": f"pack.max_train_pairs {params.max_train_pairs}: a seeded choice of the train pairs"},
        "train": {"samples": n_train, "identities": len(classes), "buckets": n_buckets,
                  "standalone_twins": own_twins, "shards": train_shards},
        "val": {"samples": n_val, "identities": val_ids, "images_not_packed": val_unused,
                "shards": val_shards},
    }
    if (overlap or {}).get("checked"):  # an external set, checked by face
        index["overlap_dropped"] = {"images": overlap_images, "identities": overlap_ids,
                                    "reason": "the same face as an LFW person (the overlap stage)"}
    write_json(out_dir / INDEX_FILE, index)
    return index

