"""The shard pair loader on the tiny real pipeline's shards."""
from __future__ import annotations

from dataclasses import replace

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.align.geometry import TEMPLATES
from pipeline.config import AugmentParams
from pipeline.train.pair_loader import PairAugment, make_pair_loader, mean_grey, shard_samples, shuffled, to_batch
from pipeline.seeding import seed_for
from pipeline.data.tar_chunks import read_chunk


def _shards(tiny_shards, split="train"):
    index = json.loads((tiny_shards / "index.json").read_text())
    return [tiny_shards / s["name"] for s in index[split]["shards"]]


def test_eval_batches_shapes_range_and_order(tiny_shards):
    shards = _shards(tiny_shards)
    batches = list(make_pair_loader(shards, batch_size=4, augment=None, seed=0, drop_last=False))
    raw = torch.cat([b[0] for b in batches])
    masked = torch.cat([b[1] for b in batches])
    labels = torch.cat([b[2] for b in batches])
    index = json.loads((tiny_shards / "index.json").read_text())
    side = TEMPLATES[index["template"]].size
    assert raw.shape == masked.shape == (index["train"]["samples"], 3, side, side)
    assert raw.dtype == masked.dtype == torch.float32 and labels.dtype == torch.int64
    assert all(isinstance(b[0], torch.Tensor) and b[0].is_contiguous(memory_format=torch.channels_last)
               for b in batches)  # NHWC memory: the layout the training step uses, no copy there
    assert [int(k) for k in labels] == [int(m["cls"]) for s in shards for _, m in read_chunk(s)]
    assert -1.0 <= raw.min() and raw.max() <= 1.0 and raw.std() > 0.1
    # no augmentation: deterministic and identical twice
    again = torch.cat([b[0] for b in make_pair_loader(shards, batch_size=4, augment=None, seed=5,
                                                      drop_last=False)])
    assert torch.equal(raw, again)
    # the twins differ only where the mask is: the upper half (eyes, forehead) matches closely
    assert (raw[:, :, :48] - masked[:, :, :48]).abs().mean() < 0.03
    assert (raw[:, :, 72:] - masked[:, :, 72:]).abs().mean() > 0.1


def test_both_twins_get_the_same_flip_crop_and_colour(tiny_shards):
    """Augmented pairs: the upper half of raw and masked still match (one shared draw), while an
    independent draw per twin (what the seed did) would not."""
    aug = AugmentParams(flip=True, crop_jitter=0.1, scale_jitter=0.1, color_jitter=0.3)
    loader = make_pair_loader(_shards(tiny_shards), batch_size=4, augment=aug, seed=3, shuffle_buffer=16)
    raw, masked, _ = (torch.cat(t) for t in zip(*list(loader)))
    assert len(raw) >= 8
    shared = (raw[:, :, :48] - masked[:, :, :48]).abs().mean(dim=(1, 2, 3))
    assert shared.max() < 0.05
    # the draw does change the images: compare against the unaugmented pairs
    plain = torch.cat([b[0] for b in make_pair_loader(_shards(tiny_shards), batch_size=4, augment=None,
                                                      seed=3, drop_last=False)])
    assert not any(torch.equal(r, p) for r in raw for p in plain)
    # direct check on an asymmetric image: the same draw gives the same output for both twins,
    # a different draw gives a different one
    img = np.zeros((112, 112, 3), np.uint8)
    img[10:40, 5:30] = (200, 50, 20)
    draws = [PairAugment.draw(aug, np.random.default_rng(seed_for(0, 0, f"k{i}"))) for i in range(8)]
    assert any(d.flip for d in draws) and any(not d.flip for d in draws)
    for d in draws:
        assert np.array_equal(d.apply(img), d.apply(img.copy()))
    assert not np.array_equal(draws[0].apply(img), draws[1].apply(img))
    flip_only = PairAugment(True, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    assert np.array_equal(flip_only.apply(img), img[:, ::-1])


def test_standalone_geometry_moves_the_masked_twin_alone_by_the_measured_spread(tiny_shards):
    """masked_geometry: standalone (issue 23 item 2): the shared draw is unchanged (the raw twin's
    output is byte for byte the "pair" one), the masked twin is moved on top, and over many draws
    the moves have the mean and spread measured for standalone alignment on masked photos."""
    from pipeline.train.pair_loader import MASKED_GEOMETRY

    pair, standalone = AugmentParams(), AugmentParams(masked_geometry="standalone")
    draws = [(PairAugment.draw(pair, np.random.default_rng(seed_for(0, 0, f"k{i}"))),
              PairAugment.draw(standalone, np.random.default_rng(seed_for(0, 0, f"k{i}")))) for i in range(2000)]
    assert all(a.masked is None and b.masked is not None and replace(b, masked=None) == a for a, b in draws)
    moves = np.array([b.masked for _, b in draws])
    assert np.allclose(moves.mean(0), MASKED_GEOMETRY["mean"], atol=3 * np.array(MASKED_GEOMETRY["std"]) / np.sqrt(2000))
    assert np.allclose(moves.std(0), MASKED_GEOMETRY["std"], rtol=0.1)
    # the move's matrix: the centre shifts by (dx, dy) crop sides, turns by the angle, scales by exp(log scale)
    b = PairAugment(False, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, masked=(0.02, -0.01, 5.0, 0.05))
    m = b.masked_matrix(150)
    c = np.array([74.5, 74.5, 1.0])
    assert np.allclose(m @ c - c, [3.0, -1.5, 0.0])
    assert np.isclose(np.degrees(np.arctan2(m[1, 0], m[0, 0])), 5.0) and np.isclose(np.linalg.det(m[:2, :2]), np.exp(0.1))
    # on real twins: raw as in "pair", masked moved (and its unmasked upper half no longer matches)
    loaders = {g: make_pair_loader(_shards(tiny_shards), batch_size=4, augment=AugmentParams(masked_geometry=g),
                                   seed=3, shuffle_buffer=16) for g in ("pair", "standalone")}
    (raw_p, masked_p, _), (raw_s, masked_s, _) = ([torch.cat(t) for t in zip(*list(loaders[g]))] for g in loaders)
    assert torch.equal(raw_p, raw_s) and not torch.equal(masked_p, masked_s)
    assert (raw_s[:, :, :48] - masked_s[:, :, :48]).abs().mean() > 2 * (raw_p[:, :, :48] - masked_p[:, :, :48]).abs().mean()


def test_detected_geometry_trains_on_the_twin_aligned_on_its_own(tiny_twin_shards):
    """masked_geometry: detected: the masked twin is masked_standalone.jpg (the pair's masked.jpg
    where no face was found), the raw twin and the augmentation draw are the pair's."""
    from pipeline.align.geometry import STANDALONE_TWIN
    from pipeline.data.images import decode_rgb

    still = dict(flip=False, crop_jitter=0.0, scale_jitter=0.0, color_jitter=0.0)
    shards = _shards(tiny_twin_shards)
    loaders = {g: make_pair_loader(shards, batch_size=4, augment=AugmentParams(masked_geometry=g, **still),
                                   seed=0, shuffle_buffer=1, return_keys=True) for g in ("pair", "detected")}
    (raw_p, masked_p, _, keys_p), (raw_d, masked_d, _, keys_d) = (
        [torch.cat(t) if isinstance(t[0], torch.Tensor) else sum(t, []) for t in zip(*list(loaders[g]))]
        for g in loaders)
    assert keys_p == keys_d and torch.equal(raw_p, raw_d)
    members = {k: m for s in shards for k, m in read_chunk(s)}
    for i, key in enumerate(keys_d):
        m = members[key]
        assert torch.equal(masked_d[i], to_batch(decode_rgb(m.get(STANDALONE_TWIN, m["masked.jpg"]))[None])[0])
        assert torch.equal(masked_p[i], to_batch(decode_rgb(m["masked.jpg"])[None])[0])
    assert any(STANDALONE_TWIN in members[k] for k in keys_d) and not torch.equal(masked_p, masked_d)


def test_workers_epochs_and_shuffle(tiny_shards):
    aug = AugmentParams()
    shards = _shards(tiny_shards)

    def keys(**kw):
        return [k for b in make_pair_loader(shards, batch_size=1, augment=aug, seed=1, drop_last=False,
                                            return_keys=True, **kw) for k in b[3]]

    everything = sorted(k for s in shards for k, _ in read_chunk(s))
    one = keys(epoch=0, num_workers=0)
    assert keys(epoch=0, num_workers=0) == one  # reproducible
    assert sorted(one) == everything  # every sample exactly once
    assert sorted(keys(epoch=0, num_workers=2)) == everything  # workers split, nothing lost or doubled
    assert keys(epoch=1, num_workers=0) != one  # a new order each epoch
    with pytest.raises(FileNotFoundError):
        make_pair_loader([tiny_shards / "nope.tar"], batch_size=2, augment=None, seed=0)
    with pytest.raises(ValueError):
        make_pair_loader([], batch_size=2, augment=None, seed=0)


def test_shard_samples_match_webdataset_and_refuse_unsafe_members(tiny_shards, tmp_path):
    import io
    import tarfile

    import webdataset as wds

    from pipeline.data.tar_chunks import UnsafeArchiveError, write_tar

    # the packed shards, plus one with 200-character keys (GNU long names) and one written by
    # webdataset's own TarWriter (PAX headers for names over 100 bytes)
    samples = [(k, m) for k, m in read_chunk(_shards(tiny_shards)[0])][:2]
    long = [(f"{k.split('/')[0]}/{'d' * 150}/{k.split('/')[1]}", m) for k, m in samples]
    write_tar(tmp_path / "long.tar", long)
    with open(tmp_path / "pax.tar", "wb") as fh:
        writer = wds.TarWriter(fh, encoder=False)
        for k, m in long:
            writer.write({"__key__": k, **m})
        writer.close()
    urls = [str(p) for p in _shards(tiny_shards) + _shards(tiny_shards, "val")]
    urls += [str(tmp_path / "long.tar"), str(tmp_path / "pax.tar")]
    ours = list(shard_samples(urls))
    theirs = [(s["__key__"], s["raw.jpg"], s["masked.jpg"], int(s["cls"]))
              for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    assert ours == theirs and len(ours) > 0
    assert sum(len(s[0]) > 150 for s in ours) == 4
    for name, kind in (("../evil.raw.jpg", tarfile.REGTYPE), ("a/link.raw.jpg", tarfile.SYMTYPE)):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w", format=tarfile.GNU_FORMAT) as tar:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = 3 if kind == tarfile.REGTYPE else 0
            tar.addfile(ti, io.BytesIO(b"abc") if kind == tarfile.REGTYPE else None)
        with pytest.raises(UnsafeArchiveError):
            list(shard_samples([str(bad)]))
    write_tar(tmp_path / "no_cls.tar", [(k, {e: v for e, v in m.items() if e != "cls"}) for k, m in samples])
    with pytest.raises(KeyError, match="lacks member 'cls'"):
        list(shard_samples([str(tmp_path / "no_cls.tar")]))


def test_batching_pieces_equal_the_per_sample_formulas():
    """The batch path's shortcuts give exactly what the per-sample code gave: the float table is
    x / 127.5 - 1, the grey pivot is numpy's mean, an augmentation written into a batch slot is the
    one returned, and the shuffle buffer draws webdataset's order."""
    import webdataset.filters as wf

    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert torch.equal(to_batch(every), torch.from_numpy(every).permute(0, 3, 1, 2).float().div(127.5).sub(1.0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 112, 112, 3), dtype=np.uint8)
    for img in images:
        assert mean_grey(img) == float(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean())
    aug = AugmentParams(flip=True, crop_jitter=0.1, scale_jitter=0.1, color_jitter=0.3)
    variants = [aug, AugmentParams(color_jitter=0.0), AugmentParams(crop_jitter=0.0, scale_jitter=0.0),
                AugmentParams(crop_jitter=0.0, scale_jitter=0.0, color_jitter=0.0)]
    for i, params in enumerate(variants * 4):
        d = PairAugment.draw(params, np.random.default_rng(i))
        raw, masked = images[i], images[i + 1]
        want = d.apply_pair(raw, masked)
        slots = np.zeros((2, *raw.shape), np.uint8)
        got = d.apply_pair(raw, masked, slots[0], slots[1])
        assert np.array_equal(slots[0], want[0]) and np.array_equal(slots[1], want[1])
        assert np.shares_memory(got[0], slots[0]) and np.shares_memory(got[1], slots[1])
    for size, initial in ((100, 20), (8, 100), (1000, 100)):
        ours = list(shuffled(iter(range(500)), size, initial, random.Random(7)))
        assert ours == list(wf._shuffle(iter(range(500)), size, initial, rng=random.Random(7)))


def _epoch_batches(loader) -> list:
    return [(list(keys), raw.clone(), masked.clone(), label.clone()) for raw, masked, label, keys in loader]


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) > 0 and all(
        x[0] == y[0] and all(torch.equal(u, v) for u, v in zip(x[1:], y[1:])) for x, y in zip(a, b))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_persistent_workers_give_each_epoch_what_a_fresh_loader_gives(tiny_shards, context):
    """One loader, workers kept across epochs and moved on by set_epoch: every epoch (also after a
    jump, and after an epoch left half-read, as a DDP rank stops at the shortest rank's end) equals
    a fresh loader built for that epoch: the same keys, order, augmentations and labels."""
    kw = dict(batch_size=3, augment=AugmentParams(), seed=4, shuffle_buffer=8, num_workers=2, drop_last=True,
              return_keys=True)
    shards = _shards(tiny_shards)
    fresh = {e: _epoch_batches(make_pair_loader(shards, epoch=e, **kw)) for e in (0, 1, 2, 5)}
    assert not _same_batches(fresh[0], fresh[1])
    loader = make_pair_loader(shards, epoch=0, multiprocessing_context=context, **kw)
    assert _same_batches(_epoch_batches(loader), fresh[0])
    it = loader._iterator
    pids = [w.pid for w in it._workers]
    loader.set_epoch(1)
    assert _same_batches(_epoch_batches(loader), fresh[1])
    loader.set_epoch(5)
    assert _same_batches(_epoch_batches(loader), fresh[5])
    loader.set_epoch(0)
    next(iter(loader))  # half an epoch, then the next one
    loader.set_epoch(2)
    assert _same_batches(_epoch_batches(loader), fresh[2])
    assert loader._iterator is it and [w.pid for w in it._workers] == pids  # the same worker processes


def test_benchmark_ceiling_yields_the_shard_loaders_batches(tiny_shards):
    """benchmarks/loader.py's ceiling (bytes already in memory) and the shard loader give identical
    batches, so their ratio compares the same work with and without tar reading."""
    from benchmarks.loader import MemorySource

    shards = _shards(tiny_shards)
    memory = MemorySource(shards)
    for workers in (0, 2):
        kw = dict(batch_size=4, augment=AugmentParams(), seed=2, epoch=1, shuffle_buffer=16, num_workers=workers,
                  return_keys=True)
        assert _same_batches(_epoch_batches(make_pair_loader(shards, **kw)),
                             _epoch_batches(make_pair_loader(shards, source=memory, **kw)))


def test_training_builds_its_loader_once_and_sets_each_epoch(tiny_shards, tmp_path):
    from pipeline.config import TrainParams
    from pipeline.train.loop import train

    calls, epochs = [], []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        loader = make_pair_loader(*args, **kwargs)
        set_epoch = loader.set_epoch
        loader.set_epoch = lambda e: (epochs.append(e), set_epoch(e))[1]
        return loader

    params = TrainParams(backbone="resnet18", pretrained="none", wise_alpha=1.0, distill={"teacher": "self"},
                         batch_size=4, embedding_dim=8, warmup_steps=1, num_workers=2, shuffle_buffer=8,
                         epochs=3, val_every=0, log_every=5, device="cpu")
    train(params=params, shards_dir=tiny_shards, out_dir=tmp_path / "m", live_dir=tmp_path / "l",
          resume_dir=tmp_path / "r", make_loader=spy)
    assert len(calls) == 1 and calls[0]["epoch"] == 0 and calls[0]["num_workers"] == 2
    assert calls[0]["pin_memory"] is False  # pinned only when training on CUDA
    assert epochs == [1, 2]


def _rank_keys(rank: int, world: int, port: int, shards: list[str], out: str) -> None:
    """One DDP rank (gloo process group) iterating a loader whose 2 workers are SPAWNED: they do not
    inherit the process group, so the rank split must be fixed when the dataset is built."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = make_pair_loader(shards, batch_size=2, augment=AugmentParams(), seed=0, num_workers=2,
                                  drop_last=False, return_keys=True, multiprocessing_context="spawn")
        keys = [k for b in loader for k in b[3]]
        Path(out, f"rank-{rank}.txt").write_text("\n".join(keys))
    finally:
        dist.destroy_process_group()


def test_ranks_times_spawned_workers_read_disjoint_shards_once(tiny_shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    shards = [str(s) for s in _shards(tiny_shards)]
    assert len(shards) >= 4  # 2 ranks x 2 workers each get a shard
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_keys, args=(2, port, shards, str(tmp_path)), nprocs=2, start_method="spawn")
    per_rank = [Path(tmp_path, f"rank-{r}.txt").read_text().split() for r in range(2)]
    everything = sorted(k for s in shards for k, _ in read_chunk(s))
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
    assert sorted(per_rank[0] + per_rank[1]) == everything  # every sample exactly once
