"""The pack stage on the tiny real pipeline's aligned pairs."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.pack import stage as pack
from pipeline.config import ALL_MASK_TYPES, MASK_TYPES, ComputeParams, PackParams
from pipeline.mask.records import read_mask_types
from pipeline.pack.stage import PackError, run_pack
from pipeline.data.tar_chunks import FIXED_MTIME, file_sha256, list_chunks, read_chunk, record_chunks


def _aligned_keys(aligned: Path, split: str) -> list[str]:
    return sorted(k for c in list_chunks(aligned / "chunks", prefix=f"{split}-") for k, _ in read_chunk(c))


def _samples(shard: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))


def test_shards_layout_labels_and_index(tiny_shards):
    aligned = tiny_shards.parent / "aligned"
    index = json.loads((tiny_shards / "index.json").read_text())
    classes = json.loads((tiny_shards / "classes.json").read_text())
    assert sorted(classes.values()) == list(range(len(classes))) == list(range(index["classes"]))
    assert list(classes) == sorted(classes)  # labels follow the sorted identity names
    train = [s for sh in index["train"]["shards"] for s in _samples(tiny_shards / sh["name"])]
    val = [s for sh in index["val"]["shards"] for s in _samples(tiny_shards / sh["name"])]
    assert not list(tiny_shards.glob("test-*.tar"))  # evaluation reads the aligned test chunks
    for sh in index["train"]["shards"] + index["val"]["shards"]:
        assert file_sha256(tiny_shards / sh["name"]) == sh["sha256"]
        assert 1 <= sh["samples"] <= 4  # the fixture's shard_max_count
        with tarfile.open(tiny_shards / sh["name"]) as tar:  # fixed metadata: reproducible bytes
            assert {(m.mtime, m.uname, m.gname, m.mode) for m in tar} == {(FIXED_MTIME, "", "", 0o644)}
    # every aligned train pair: once, in the train shards (shuffled), the val shards (key order) or
    # held out for its unseen mask type (a training person's only)
    val_ids = index["val"]["identities"]
    types = read_mask_types(tiny_shards.parent / "masked")
    held = [k for k in _aligned_keys(aligned, "train")
            if types[k] in index["params"]["unseen_mask_types"] and k.split("/")[0] not in val_ids]
    assert index["held_out_mask_types"]["images"] == len(held)  # none in this fixture: test below
    assert sorted([s["__key__"] for s in train + val] + held) == _aligned_keys(aligned, "train")
    assert not {types[s["__key__"]] for s in train} & set(index["params"]["unseen_mask_types"])
    assert [s["__key__"] for s in val] == sorted(s["__key__"] for s in val)
    assert [s["__key__"] for s in train] != sorted(s["__key__"] for s in train)  # globally shuffled
    for s in train:
        assert set(s) >= {"raw.jpg", "masked.jpg", "cls", "json"}
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == classes[meta["identity"]] and meta["split"] == "train"
    for s in val:
        meta = json.loads(s["json"])
        assert meta["split"] == "val" and int(s["cls"]) == val_ids.index(meta["identity"])
    assert index["train"]["samples"] == len(train) and index["val"]["samples"] == len(val)


def test_long_keys_pack_and_load_end_to_end(tiny_shards, tmp_path):
    """Keys of 200 characters (deep ImageFolder paths): GNU long names, read back by the loader."""
    import shutil

    from pipeline.train.pair_loader import make_pair_loader
    from pipeline.data.tar_chunks import write_chunk

    aligned = tmp_path / "aligned"
    (aligned / "chunks").mkdir(parents=True)
    for chunk in list_chunks(tiny_shards.parent / "aligned" / "chunks", prefix="train-"):
        samples = []
        for key, members in read_chunk(chunk):
            ident, _, rest = key.partition("/")
            long_key = f"{ident}/{'d' * (198 - len(ident) - len(rest))}/{rest}"
            meta = json.loads(members["json"]) | {"image_id": long_key}
            samples.append((long_key, {**members, "json": json.dumps(meta).encode()}))
        write_chunk(aligned / "chunks" / chunk.name, samples)
    record_chunks(aligned / "chunks")
    shutil.copy(tiny_shards.parent / "aligned" / "status.parquet", aligned / "status.parquet")
    every_type = {"unseen_mask_types": []}  # renamed keys: the mask stage recorded none of them
    index = run_pack(params=PackParams(shard_max_count=4, **every_type), aligned_dir=aligned, out_dir=tmp_path / "shards")
    shards = list_chunks(tmp_path / "shards", "train-")
    with tarfile.open(shards[0]) as tar:
        assert max(len(m.name) for m in tar) > 200 and tar.pax_headers == {}
    loader = make_pair_loader(shards, batch_size=2, augment=None, seed=0, drop_last=False, return_keys=True)
    keys = [k for *_, ks in loader for k in ks]
    assert len(keys) == index["train"]["samples"] and all(len(k) == 200 for k in keys)
    # and the shard cut counts the long-name records: no shard over its byte budget
    small = run_pack(params=PackParams(shard_max_bytes=40_000, **every_type), aligned_dir=aligned, out_dir=tmp_path / "s2")
    assert all(s["bytes"] <= 40_000 or s["samples"] == 1 for s in small["train"]["shards"])


def test_byte_identical_and_shard_cut_by_bytes(tiny_shards, tmp_path, monkeypatch):
    aligned = tiny_shards.parent / "aligned"
    a = run_pack(params=PackParams(shard_max_bytes=60_000), aligned_dir=aligned, out_dir=tmp_path / "a")
    # the same bytes when memory only holds about one shard at a time (several passes)
    monkeypatch.setattr(pack, "PACK_MEMORY_BYTES", 50_000)
    b = run_pack(params=PackParams(shard_max_bytes=60_000), aligned_dir=aligned, out_dir=tmp_path / "b")
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert len(a["train"]["shards"]) >= 2
    assert all(s["bytes"] <= 60_000 or s["samples"] == 1 for s in a["train"]["shards"])
    # another seed, another order; same content
    c = run_pack(params=PackParams(seed=1), aligned_dir=aligned, out_dir=tmp_path / "c")
    order = lambda d, idx: [s["__key__"] for sh in idx["train"]["shards"] for s in _samples(d / sh["name"])]
    first = order(tmp_path / "a", a)
    other = order(tmp_path / "c", c)
    assert other != first and sorted(other) == sorted(first)


def test_min_images_filter_and_errors(tiny_shards, tmp_path):
    aligned = tiny_shards.parent / "aligned"
    counts = Counter(k.split("/")[0] for k in _aligned_keys(aligned, "train"))
    cut = sorted(counts.values())[len(counts) // 2]
    idx = run_pack(params=PackParams(min_images_per_identity=cut), aligned_dir=aligned, out_dir=tmp_path / "f")
    kept = {i for i, c in counts.items() if c >= cut}
    assert idx["classes"] + len(idx["val"]["identities"]) == len(kept)
    assert (idx["train"]["samples"] + idx["val"]["samples"] + idx["val"]["images_not_packed"]
            + idx["held_out_mask_types"]["images"] == sum(counts[i] for i in kept))
    assert idx["filtered"]["images"] == sum(counts.values()) - sum(counts[i] for i in kept)
    with pytest.raises(PackError, match="no train identity"):
        run_pack(params=PackParams(min_images_per_identity=10_000), aligned_dir=aligned, out_dir=tmp_path / "g")
    with pytest.raises(PackError, match="run the align stage"):
        run_pack(params=PackParams(), aligned_dir=tmp_path / "none", out_dir=tmp_path / "h")


def _shard_keys(folder: Path, shards: list[dict]) -> list[str]:
    return [s["__key__"] for sh in shards for s in _samples(folder / sh["name"])]


def test_bucket_shuffle_is_the_same_whatever_the_workers_and_memory(tiny_shards, tmp_path, monkeypatch):
    """Several buckets (a small BUCKET_BYTES on the tiny set): n_jobs 1 and 2 and a memory budget
    of about one shard (buckets read again per group) give the same bytes; the train order is the
    documented one (bucket by bucket, each a seeded permutation of its sorted keys); every kept
    pair is packed exactly once; no fragment is left behind."""
    aligned = tiny_shards.parent / "aligned"
    monkeypatch.setattr(pack, "BUCKET_BYTES", 60_000)
    params = PackParams(shard_max_count=3, seed=5)
    a = run_pack(params=params, aligned_dir=aligned, out_dir=tmp_path / "a", compute=ComputeParams(n_jobs=1))
    b = run_pack(params=params, aligned_dir=aligned, out_dir=tmp_path / "b", compute=ComputeParams(n_jobs=2))
    monkeypatch.setattr(pack, "PACK_MEMORY_BYTES", 30_000)
    c = run_pack(params=params, aligned_dir=aligned, out_dir=tmp_path / "c", compute=ComputeParams(n_jobs=2))
    assert a == b == c and a["train"]["buckets"] >= 3
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    for other in ("b", "c"):
        assert {p.name: p.read_bytes() for p in (tmp_path / other).iterdir()} == files
    assert all(p.is_file() for p in (tmp_path / "a").iterdir())  # no .fragments folder left
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    types = read_mask_types(tiny_shards.parent / "masked")
    train_keys = [k for k in _aligned_keys(aligned, "train")
                  if k.split("/")[0] in classes and types[k] not in params.unseen_mask_types]
    n = a["train"]["buckets"]
    expected = [k for bucket in range(n)
                for k in pack.bucket_order(5, bucket, [k for k in train_keys if pack.bucket_of(5, k, n) == bucket])]
    got = _shard_keys(tmp_path / "a", a["train"]["shards"])
    assert got == expected and len(got) == len(set(got)) == a["train"]["samples"]
    val = _shard_keys(tmp_path / "a", a["val"]["shards"])
    assert not set(val) & set(got)


def test_val_takes_the_first_images_of_each_held_out_identity(tiny_shards, tmp_path):
    """The first val_images_per_identity keys of each held-out identity over all chunks, by identity
    then key, even when an identity's images lie in several chunks (tiny chunks here)."""
    from pipeline.data.tar_chunks import write_chunk

    src = tiny_shards.parent / "aligned"
    aligned = tmp_path / "aligned"
    samples = [s for c in list_chunks(src / "chunks", prefix="train-") for s in read_chunk(c)]
    for i in range(0, len(samples), 3):  # 3 pairs per chunk: identities span chunks
        write_chunk(aligned / "chunks" / f"train-{i // 3:06d}.tar", samples[i:i + 3])
    record_chunks(aligned / "chunks")
    params = PackParams(val_fraction=0.5, val_images_per_identity=2, shard_max_count=3, unseen_mask_types=[])
    index = run_pack(params=params, aligned_dir=aligned, out_dir=tmp_path / "s", compute=ComputeParams(n_jobs=2))
    by_id: dict[str, list[str]] = {}
    for key, _ in samples:
        by_id.setdefault(key.split("/")[0], []).append(key)
    val_ids = index["val"]["identities"]
    assert len(val_ids) >= 2 and any(len(by_id[i]) > 2 for i in val_ids)
    assert _shard_keys(tmp_path / "s", index["val"]["shards"]) == [k for i in val_ids for k in sorted(by_id[i])[:2]]
    assert index["val"]["images_not_packed"] == sum(len(by_id[i]) - 2 for i in val_ids)
    assert all(s["samples"] <= 3 for s in index["val"]["shards"])


def test_validation_people_are_drawn_among_those_with_two_images():
    """Only people with >= 2 images give validation a same pair: people with one stay in training;
    the share is of the former, and holding all of them out is refused."""
    from pipeline.pack.stage import split_val_identities

    counts = {f"p{i:02d}": 1 + (i % 3 == 0) * 4 for i in range(40)}  # 14 people with 5 images, 26 with 1
    val = split_val_identities(counts, PackParams(val_fraction=0.5))
    assert len(val) == 7 and all(counts[i] == 5 for i in val) and val == sorted(val)
    assert split_val_identities(counts, PackParams(val_fraction=0.5)) == val  # seeded
    assert split_val_identities(counts, PackParams(val_fraction=0.5, seed=1)) != val
    assert len(split_val_identities(counts, PackParams(val_fraction=0.5, val_max_identities=3))) == 3
    assert split_val_identities(counts, PackParams(val_fraction=0.0)) == []
    with pytest.raises(PackError, match="none would be left to train on"):
        split_val_identities({"a": 2, "b": 2, "c": 1}, PackParams(val_fraction=0.5))


def test_unseen_mask_types_stay_out_of_training_only(tiny_shards, tmp_path):
    """pack.unseen_mask_types: a training person's pairs of those types are not packed (counted in
    held_out_mask_types), a validation person's are; a person left with no pair gets no class.
    Every type unseen but one changes which pairs train; none unseen packs them all."""
    aligned, masked = tiny_shards.parent / "aligned", tiny_shards.parent / "masked"
    types = read_mask_types(masked)
    keys = _aligned_keys(aligned, "train")
    seen_in_set = sorted({types[k] for k in keys})
    assert len(seen_in_set) >= 2  # the tiny set wears several types
    keep = seen_in_set[0]
    unseen = sorted(set(MASK_TYPES) - {keep})
    idx = run_pack(params=PackParams(unseen_mask_types=unseen), aligned_dir=aligned, masked_dir=masked,
                   out_dir=tmp_path / "a")
    train = [s["__key__"] for sh in idx["train"]["shards"] for s in _samples(tmp_path / "a" / sh["name"])]
    val = [s["__key__"] for sh in idx["val"]["shards"] for s in _samples(tmp_path / "a" / sh["name"])]
    val_ids = set(idx["val"]["identities"])
    assert train and all(types[k] == keep for k in train)
    assert {types[k] for k in val} - {keep}  # validation keeps the unseen types
    held = [k for k in keys if k.split("/")[0] not in val_ids and types[k] != keep]
    assert idx["held_out_mask_types"] == {"types": unseen, "images": len(held),
                                          "identities_without_a_seen_pair": idx["held_out_mask_types"][
                                              "identities_without_a_seen_pair"],
                                          "reason": "a training pair whose twin wears an unseen mask type"}
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    trained_people = {k.split("/")[0] for k in keys if k.split("/")[0] not in val_ids}
    assert set(classes) == {k.split("/")[0] for k in train}
    assert idx["held_out_mask_types"]["identities_without_a_seen_pair"] == len(trained_people - set(classes))
    none = run_pack(params=PackParams(unseen_mask_types=[]), aligned_dir=aligned, out_dir=tmp_path / "b")
    assert none["train"]["samples"] == idx["train"]["samples"] + len(held)
    assert none["held_out_mask_types"]["images"] == 0
    with pytest.raises(ValueError, match="every mask type is unseen"):
        PackParams(unseen_mask_types=list(ALL_MASK_TYPES))
    # every procedural type held out leaves the bank's real masks to train on
    assert PackParams(unseen_mask_types=list(MASK_TYPES)).unseen_mask_types == sorted(MASK_TYPES)
    with pytest.raises(ValueError, match="distinct mask types"):
        PackParams(unseen_mask_types=["n99"])
    # an aligned pair the mask stage has no type for is an error, not a silent keep
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    (tmp_path / "m").mkdir()
    t = pq.read_table(masked / "status.parquet")
    pq.write_table(t.filter(pc.not_equal(t.column("image_id"), keys[0])), tmp_path / "m" / "status.parquet")
    with pytest.raises(PackError, match="records no mask type"):
        run_pack(params=PackParams(), aligned_dir=aligned, masked_dir=tmp_path / "m", out_dir=tmp_path / "c")


def test_max_train_pairs_packs_a_seeded_subset(tiny_shards, tmp_path):
    """pack.max_train_pairs: that many train pairs, a seeded choice among those the unseen types
    leave (same pairs with 1 or 2 workers; another seed, other pairs), counted in index.json's
    subsampled; val shards unchanged; a cap above the count packs everything."""
    aligned = tiny_shards.parent / "aligned"
    base = PackParams(unseen_mask_types=[], shard_max_count=4)
    full = run_pack(params=base, aligned_dir=aligned, out_dir=tmp_path / "full")
    n = full["train"]["samples"]
    assert n >= 4
    keep = n // 2
    capped = PackParams(**{**base.model_dump(), "max_train_pairs": keep})
    a = run_pack(params=capped, aligned_dir=aligned, out_dir=tmp_path / "a")
    b = run_pack(params=capped, aligned_dir=aligned, out_dir=tmp_path / "b", compute=ComputeParams(n_jobs=2))
    other = run_pack(params=PackParams(**{**capped.model_dump(), "seed": 1}), aligned_dir=aligned,
                     out_dir=tmp_path / "c")

    def keys(idx, out):
        return sorted(s["__key__"] for sh in idx["train"]["shards"] for s in _samples(out / sh["name"]))

    assert a["train"]["samples"] == keep == len(keys(a, tmp_path / "a"))
    assert a["subsampled"]["images"] == n - keep
    assert set(keys(a, tmp_path / "a")) < set(keys(full, tmp_path / "full"))
    assert [s["sha256"] for s in a["train"]["shards"]] == [s["sha256"] for s in b["train"]["shards"]]
    assert keys(other, tmp_path / "c") != keys(a, tmp_path / "a")
    assert [s["sha256"] for s in a["val"]["shards"]] == [s["sha256"] for s in full["val"]["shards"]]
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    assert set(classes) == {k.split("/")[0] for k in keys(a, tmp_path / "a")}  # no class without a pair
    above = run_pack(params=PackParams(**{**base.model_dump(), "max_train_pairs": n + 1}), aligned_dir=aligned,
                     out_dir=tmp_path / "d")
    assert above["train"]["samples"] == n and above["subsampled"]["images"] == 0
    with pytest.raises(ValueError, match="max_train_pairs"):
        PackParams(max_train_pairs=0)


def test_standalone_twins_go_to_train_shards_only(tiny_twin_shards):
    """A train pair carries masked_standalone.jpg where align wrote one (index.json counts them);
    a val pair never does: validation scores the pair's crops."""
    from pipeline.align.geometry import STANDALONE_TWIN

    index = json.loads((tiny_twin_shards / "index.json").read_text())
    aligned = {k: m for c in list_chunks(tiny_twin_shards.parent / "aligned" / "chunks", prefix="train-")
               for k, m in read_chunk(c)}
    train = [s for sh in index["train"]["shards"] for s in _samples(tiny_twin_shards / sh["name"])]
    val = [s for sh in index["val"]["shards"] for s in _samples(tiny_twin_shards / sh["name"])]
    carried = [s for s in train if STANDALONE_TWIN in s]
    assert carried and index["train"]["standalone_twins"] == len(carried)
    assert len(carried) == sum(STANDALONE_TWIN in aligned[s["__key__"]] for s in train)
    assert all(s[STANDALONE_TWIN] == aligned[s["__key__"]][STANDALONE_TWIN] for s in carried)
    assert val and not any(STANDALONE_TWIN in s for s in val)
