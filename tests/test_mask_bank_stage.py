"""pipeline/mask/bank_stage.py: a folder of real masked photos (RMFD) -> the mask bank, every file
kept or rejected with its reason, byte-identical across worker counts; and the mask stage wearing
its entries on real LFW faces (type "real"), or drawing exactly what it drew before with weight 0."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.config import ComputeParams, MaskBankParams, MaskParams, parse_params
from pipeline.data.images import decode_rgb
from pipeline.mask import bank_stage
from pipeline.mask.bank_stage import MaskBankError, link_source, load_bank, run_mask_bank
from pipeline.mask.stage import MaskStageError, run_mask
from pipeline.stage_report import status_rows
from pipeline.data.tar_chunks import UnsafeArchiveError, list_chunks, read_chunk
from tests.conftest import RMFD_KEPT, make_bank_subset, tree_hashes
from tests.test_mask_stage import SERIAL

REAL = {"surgical": 1.0, "real": 3.0}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four RMFD photos (two kept), and what a user's folder also holds: a note, a corrupt JPEG, a
    copy of a photo, a link to nowhere and a folder link out of the source."""
    root = make_bank_subset(tmp_path_factory.mktemp("bank_src"))
    (root / "0002").mkdir()
    (root / "0002" / "again.jpg").write_bytes((root / RMFD_KEPT[1]).read_bytes())
    (root / "notes.txt").write_text("not a photo")
    (root / "0001" / "cut_short.jpg").write_bytes((root / RMFD_KEPT[0]).read_bytes()[:900])
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    os.symlink(tmp_path_factory.mktemp("elsewhere"), root / "linked_folder")
    return root


@pytest.fixture(scope="module")
def bank(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "mask_bank"
    return out, run_mask_bank(params=MaskBankParams(path=str(photos)), compute=SERIAL, out_dir=out)


def test_every_file_is_kept_or_rejected_with_its_reason(bank):
    out, summary = bank
    rows = {r["source"]: r for r in status_rows(out)}
    assert summary["inputs"] == len(rows) == 9 == summary["kept"] + summary["rejected"]
    assert summary["kept"] == 2 and {s for s, r in rows.items() if r["status"] == "kept"} == set(RMFD_KEPT)
    assert rows["0001/0013.jpg"]["reason"].startswith("no clear subject")
    assert rows["0001/0026.jpg"]["reason"].startswith("one-sided cut")
    assert rows["0001/cut_short.jpg"]["reason"].startswith("truncated or corrupt image")
    assert rows["notes.txt"]["reason"].startswith("unsupported extension .txt")
    assert rows["broken.jpg"]["reason"].startswith("broken link")
    assert rows["0002/again.jpg"]["reason"] == f"duplicate: the same file as {RMFD_KEPT[1]}"
    assert rows["linked_folder"]["reason"].startswith("folder link not followed")
    assert summary["rejection_reasons"] == {"broken link": 1, "duplicate": 1, "folder link not followed": 1,
                                            "no clear subject": 1,
                                            "one-sided cut": 1, "truncated or corrupt image": 1,
                                            "unsupported extension .txt": 1}
    # each kept row carries its scores and its entry; the entry records its source photo
    kept = [r for r in rows.values() if r["status"] == "kept"]
    assert all(r["mouth_cover"] >= 0.9 and r["symmetry"] >= 0.65 and r["entry"] for r in kept)
    metas = {json.loads(m["json"])["source"] for c in list_chunks(out / "entries") for _, m in read_chunk(c)}
    assert metas == set(RMFD_KEPT)
    entries = load_bank(out)
    assert [t.texture for t in entries] == sorted(RMFD_KEPT) and all(t.mask_type == "real" for t in entries)
    assert all(t.rgba.shape == entries[0].rgba.shape and (t.rgba[..., 3] > 127).mean() > 0.2 for t in entries)
    for sheet in ("contact_sheet.png", "rejects.png"):
        assert decode_rgb((out / sheet).read_bytes()).shape[0] > 100


def test_photos_in_bank_are_the_kept_ones_and_their_copies(bank, photos, tmp_path):
    from pipeline.mask.bank_stage import photos_in_bank

    out, _ = bank
    assert photos_in_bank(out) == {*RMFD_KEPT, "0002/again.jpg"}  # again.jpg: a copy of a kept photo
    assert photos_in_bank(tmp_path / "no_bank") == set()


def test_bank_is_byte_identical_across_runs_and_workers(photos, bank, tmp_path, monkeypatch):
    out, summary = bank
    again = run_mask_bank(params=MaskBankParams(path=str(photos)), compute=SERIAL, out_dir=tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == tree_hashes(out) and again == summary
    monkeypatch.setattr(bank_stage, "BATCH", 2)  # three batches, shared by the two workers
    one = run_mask_bank(params=MaskBankParams(path=str(photos)), compute=SERIAL, out_dir=tmp_path / "one")
    two = run_mask_bank(params=MaskBankParams(path=str(photos)), compute=ComputeParams(n_jobs=2),
                        out_dir=tmp_path / "two")
    assert one == two == summary
    assert tree_hashes(tmp_path / "one") == tree_hashes(tmp_path / "two")


def test_no_photos_gives_an_empty_bank_that_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in ("empty", "missing"):
        s = run_mask_bank(params=MaskBankParams(path=str(tmp_path / path)), compute=SERIAL, out_dir=tmp_path / f"b_{path}")
        assert s["inputs"] == s["kept"] == 0 and "procedural masks only" in s["note"]
        assert load_bank(tmp_path / f"b_{path}") == []
    assert s["source_found"] is False and "no folder at" in s["note"]


def test_the_mask_stage_wears_bank_entries(bank, tmp_path):
    from tests.test_mask_stage import ingest_into
    from tests.conftest import make_lfw_subset

    out, _ = bank
    ingested = ingest_into(make_lfw_subset(tmp_path / "lfw", 3, 2), tmp_path / "ingest", chunk_size=6)
    params = MaskParams(type_weights=REAL)
    summary = run_mask(params=params, compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "m", bank_dir=out)
    rows = [r for r in status_rows(tmp_path / "m") if r["status"] == "masked"]
    real = [r for r in rows if r["mask_type"] == "real"]
    assert len(real) > len(rows) / 2 and {r["texture"] for r in real} == set(RMFD_KEPT)
    assert all(r["colour"] == "photo" for r in real)
    assert summary["bank"]["images"] == len(real) and summary["bank"]["entries_worn"] == 2
    assert "real" not in summary["textures"] and summary["mask_types"]["real"] == len(real)
    # the per-image record names the entry; the mask covers the lower face like a procedural one
    infos = [json.loads(m["json"]) for c in list_chunks(tmp_path / "m" / "chunks") for _, m in read_chunk(c)]
    assert {i["texture"] for i in infos if i["mask_type"] == "real"} == set(RMFD_KEPT)
    # the same outputs from two workers
    run_mask(params=params, compute=ComputeParams(n_jobs=2), in_dir=ingested, out_dir=tmp_path / "m2", bank_dir=out)
    assert tree_hashes(tmp_path / "m2") == tree_hashes(tmp_path / "m")
    # weight 0: byte for byte what the stage draws with no bank at all
    run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "p0", bank_dir=out)
    run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "none")
    assert tree_hashes(tmp_path / "p0") == tree_hashes(tmp_path / "none")
    # bank_splits [train]: the test people's masks are byte for byte those drawn without the real type
    run_mask(params=MaskParams(type_weights=REAL, bank_splits=["train"]), compute=SERIAL, in_dir=ingested,
             out_dir=tmp_path / "tr", bank_dir=out)
    run_mask(params=MaskParams(type_weights={"surgical": 1.0}), compute=SERIAL, in_dir=ingested,
             out_dir=tmp_path / "proc")
    tr, proc = tree_hashes(tmp_path / "tr"), tree_hashes(tmp_path / "proc")
    test_chunks = [k for k in tr if k.startswith("chunks/test-")]
    assert test_chunks and all(tr[k] == proc[k] for k in test_chunks)
    rows_tr = status_rows(tmp_path / "tr")
    assert {r["mask_type"] for r in rows_tr if r["split"] == "test"} == {"surgical"}
    assert "real" in {r["mask_type"] for r in rows_tr if r["split"] == "train"}
    # a weight on "real" with an empty bank: refused before any work, naming the key
    (tmp_path / "nothing").mkdir()
    run_mask_bank(params=MaskBankParams(path=str(tmp_path / "nothing")), compute=SERIAL, out_dir=tmp_path / "eb")
    with pytest.raises(MaskStageError, match=r"mask.type_weights.real = 3.0.*no entries"):
        run_mask(params=params, compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "x", bank_dir=tmp_path / "eb")
    assert not (tmp_path / "x").exists()


def test_params_name_the_bank_type():
    assert parse_params({"mask": {"type_weights": {"real": 1.0}}}).mask.type_weights == {"real": 1.0}
    with pytest.raises(ValueError, match=r"mask.type_weights.*allowed: \['surgical', 'n95', 'kn95', 'cloth', 'gas', 'real'\]"):
        parse_params({"mask": {"type_weights": {"paper": 1.0}}})
    assert parse_params({"pack": {"unseen_mask_types": ["real"]}}).pack.unseen_mask_types == ["real"]


def test_link_source_never_replaces_a_folder_of_photos(photos, tmp_path):
    dest = tmp_path / "data" / "sources" / "rmfd"
    assert "made empty" in link_source(dest, None) and dest.is_dir() and not dest.is_symlink()
    assert "->" in link_source(dest, str(photos)) and dest.resolve() == photos.resolve()  # the empty one replaced
    assert "already linked" in link_source(dest, str(photos))
    dest.unlink()
    dest.mkdir()
    (dest / "mine.jpg").write_bytes(b"x")
    assert "used as they are" in link_source(dest, str(photos)) and (dest / "mine.jpg").is_file()
    with pytest.raises(MaskBankError, match="not a folder"):
        link_source(tmp_path / "other", str(tmp_path / "nowhere"))


def test_a_tampered_entry_is_an_error(bank, tmp_path):
    import shutil

    out, _ = bank
    copy = tmp_path / "bank"
    shutil.copytree(out, copy)
    chunk = list_chunks(copy / "entries")[0]
    data = bytearray(chunk.read_bytes())
    data[-2000] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(UnsafeArchiveError, match="sha256"):
        load_bank(copy)
