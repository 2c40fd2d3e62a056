"""The shard pair loader on the tiny real pipeline's shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import AugmentParams
from pipeline.pair_loader import PairAugment, make_pair_loader
from pipeline.seeding import seed_for
from pipeline.tar_chunks import read_chunk


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
    assert raw.shape == masked.shape == (index["train"]["samples"], 3, 112, 112)
    assert raw.dtype == masked.dtype == torch.float32 and labels.dtype == torch.int64
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


def test_tar_samples_matches_webdataset_and_refuses_unsafe_members(tiny_shards, tmp_path):
    import io
    import tarfile

    import webdataset as wds

    from pipeline.pair_loader import tar_samples
    from pipeline.tar_chunks import UnsafeArchiveError

    # the packed shards, plus one with 200-character keys (GNU long names) and one written by
    # webdataset's own TarWriter (PAX headers for names over 100 bytes)
    from pipeline.tar_chunks import write_tar

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
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), tar_samples))
    theirs = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert len(ours) == len(theirs) > 0
    assert all(a.keys() == b.keys() and all(a[k] == b[k] for k in a) for a, b in zip(ours, theirs))
    assert sum(len(s["__key__"]) > 150 for s in ours) == 4
    for name, kind in (("../evil.raw.jpg", tarfile.REGTYPE), ("a/link.raw.jpg", tarfile.SYMTYPE)):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w", format=tarfile.GNU_FORMAT) as tar:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = 3 if kind == tarfile.REGTYPE else 0
            tar.addfile(ti, io.BytesIO(b"abc") if kind == tarfile.REGTYPE else None)
        with pytest.raises(UnsafeArchiveError):
            list(tar_samples([{"url": str(bad)}]))


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
