"""Ingest on real LFW images: each source type, bad input accounted for, determinism."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ComputeParams, DatasetParams, IngestParams
from pipeline.data.ingest import IngestError, manifest_rows, run_ingest
from pipeline.data.tar_chunks import list_chunks, read_chunk
from tests.conftest import lfw_root, tree_hashes
from tests.test_recordio import write_insightface_rec

SERIAL = ComputeParams(n_jobs=1)


def test_lfw_split_from_view1(tmp_path, lfw_small):
    s = run_ingest(params=IngestParams(chunk_size=15), dataset=DatasetParams(path=str(lfw_small)), compute=SERIAL,
                   out_dir=tmp_path)
    rows = manifest_rows(tmp_path)
    n_files = len(list((lfw_small / "lfw-deepfunneled").rglob("*.jpg")))
    assert s["inputs"] == len(rows) == n_files and s["accepted"] == n_files
    assert s["splits"]["train"]["identities"] == 6 and s["splits"]["test"]["identities"] == 4
    train = {r["identity"] for r in rows if r["split"] == "train"}
    test = {r["identity"] for r in rows if r["split"] == "test"}
    assert not train & test and s["identity_overlap_train_test"] == 0
    assert train == set((lfw_small / "peopleDevTrain.txt").read_text().split()[1::2])
    # chunks hold every accepted image once, named by split, at most chunk_size each
    seen = {}
    for chunk in list_chunks(tmp_path / "chunks"):
        samples = list(read_chunk(chunk))
        assert len(samples) <= 15 and chunk.name.split("-")[0] in ("train", "test")
        seen.update({k: m for k, m in samples})
    assert set(seen) == {r["image_id"] for r in rows}
    r0 = rows[0]
    assert seen[r0["image_id"]]["jpg"] == (lfw_small / r0["source_path"]).read_bytes()
    assert r0["image_id"] == "{0}/{0}_0001".format(r0["identity"])
    assert (tmp_path / "protocol" / "pairsDevTest.txt").is_file()


def _bad_folder(root: Path) -> dict[str, str]:
    """An ImageFolder of real LFW faces plus one file of each kind of bad input -> expected reason."""
    src = lfw_root() / "lfw-deepfunneled"
    face = (src / "George_W_Bush" / "George_W_Bush_0001.jpg").read_bytes()
    im = Image.open(io.BytesIO(face))
    for ident in ("Alice", "Bob", "Carol", "Dave"):
        (root / ident / "nested" / "deeper").mkdir(parents=True)
    people = ["Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder"]
    for ident, person in zip(("Alice", "Bob", "Carol", "Dave"), people):
        for n, f in enumerate(sorted((src / person).iterdir())[:4]):
            name = [f"img{n}.jpg", f"IMG{n}.JPG", f"img{n}.Jpeg", f"nested/deeper/img{n}.jpg"][n]
            shutil.copyfile(f, root / ident / name)

    def enc(image, fmt, **kw):
        b = io.BytesIO()
        image.save(b, format=fmt, **kw)
        return b.getvalue()

    bad = {
        "Alice/zero.jpg": (b"", "empty file"),
        "Alice/truncated.jpg": (face[:3000], "truncated or corrupt"),
        "Alice/notes.jpg": (b"this is a text file, not a photo\n", "not an image"),
        "Alice/readme.txt": (b"hello", "unsupported extension .txt"),
        "Bob/tiny.png": (enc(Image.new("RGB", (1, 1)), "PNG"), "too small"),
        "Bob/anim.png": (enc(Image.new("RGB", (32, 32)), "GIF"), "unsupported image format GIF"),
        "Bob/noext": (face, "unsupported extension (none)"),
        "stray.jpg": (face, "file not inside an identity folder"),
        "Carol/bomb.png": (enc(Image.new("1", (9000, 9000)), "PNG"), "too many pixels: 9000x9000"),
        "Carol/half.png": (enc(im, "PNG")[:2000], "truncated or corrupt"),
        "Dave/garbage.webp": (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x13" * 50, "corrupt"),
        "Dave/html.bmp": (b"<html>404</html>", "not an image"),
    }
    ok = {
        "Bob/grey.png": enc(im.convert("L"), "PNG"),
        "Bob/cmyk.jpg": enc(im.convert("CMYK"), "JPEG"),
        "Carol/rgba.PNG": enc(im.convert("RGBA"), "PNG"),
        "Carol/palette.bmp": enc(im.convert("P"), "BMP"),
        "Dave/photo.webp": enc(im, "WEBP"),
        "Dave/dup.jpg": face,  # exact duplicate of George_W_Bush_0001 (also copied below)
        "Dave/George.jpg": face,
    }
    for rel, (data, _) in bad.items():
        (root / rel).write_bytes(data)
    for rel, data in ok.items():
        (root / rel).write_bytes(data)
    return {rel: reason for rel, (_, reason) in bad.items()}


def test_imagefolder_bad_inputs_are_rejected_with_reasons(tmp_path):
    root = tmp_path / "src"
    expected = _bad_folder(root)
    s = run_ingest(params=IngestParams(max_pixels=50_000_000), dataset=DatasetParams(source="imagefolder", path=str(root)),
                   compute=SERIAL, out_dir=tmp_path / "out")
    rows = {r["source_path"]: r for r in manifest_rows(tmp_path / "out")}
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert s["inputs"] == len(rows) == n_files == s["accepted"] + s["rejected"]
    assert len(expected) >= 12
    for rel, reason in expected.items():
        assert rows[rel]["status"] == "rejected", rel
        assert reason in rows[rel]["reason"], (rel, rows[rel]["reason"])
    assert s["rejected"] == len(expected)
    assert rows["Bob/grey.png"]["reason"] == "L->RGB" and rows["Bob/cmyk.jpg"]["reason"] == "CMYK->RGB"
    assert rows["Alice/IMG1.JPG"]["status"] == "accepted"  # any letter case
    assert rows["Alice/nested/deeper/img3.jpg"]["identity"] == "Alice"  # any depth
    dups = [r for r in rows.values() if r["duplicate_of"]]
    assert len(dups) == 1 and s["exact_duplicates"] == 1
    assert {dups[0]["image_id"], dups[0]["duplicate_of"]} == {"Dave/dup", "Dave/George"}
    # an external training set: every accepted image trains (evaluation is always on LFW)
    assert {r["split"] for r in rows.values() if r["status"] == "accepted"} == {"train"}
    assert s["splits"]["test"]["images"] == 0


def test_recordio_source(tmp_path, lfw_small):
    jpgs = sorted((lfw_small / "lfw-deepfunneled").rglob("*.jpg"))
    images = [(i // 3, p.read_bytes()) for i, p in enumerate(jpgs[:12])] + [(9, b"not a jpeg")]
    src = tmp_path / "rec"
    src.mkdir()
    write_insightface_rec(src, images)
    s = run_ingest(params=IngestParams(), dataset=DatasetParams(source="recordio", path=str(src)),
                   compute=SERIAL, out_dir=tmp_path / "out")
    assert s["inputs"] == 13 and s["accepted"] == 12 and s["rejected"] == 1
    rows = manifest_rows(tmp_path / "out")
    assert {r["identity"] for r in rows} == {f"id_{i:07d}" for i in (0, 1, 2, 3, 9)}
    assert rows[0]["image_id"] == "id_0000000/000000001" and rows[0]["split"] == "train"
    stored = {k: m for c in list_chunks(tmp_path / "out" / "chunks") for k, m in read_chunk(c)}
    assert stored["id_0000000/000000001"]["jpg"] == images[0][1]


def test_deterministic_across_runs_and_workers(tmp_path, lfw_small):
    params, lfw = IngestParams(chunk_size=10), DatasetParams(path=str(lfw_small))
    run_ingest(params=params, dataset=lfw, compute=SERIAL, out_dir=tmp_path / "a")
    run_ingest(params=params, dataset=lfw, compute=ComputeParams(n_jobs=2), out_dir=tmp_path / "b")
    a, b = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert len(a) > 5 and a == b


def test_missing_source_and_protocol(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(tmp_path / "nope")), compute=SERIAL,
                   out_dir=tmp_path / "o")
    (tmp_path / "lfw" / "lfw-deepfunneled").mkdir(parents=True)
    with pytest.raises(IngestError, match="peopleDevTrain.txt"):
        run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(tmp_path / "lfw")), compute=SERIAL,
                   out_dir=tmp_path / "o")


@pytest.mark.slow
def test_full_lfw_counts(tmp_path):
    s = run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(lfw_root())), compute=ComputeParams(n_jobs=2),
                   out_dir=tmp_path)
    assert (s["inputs"], s["accepted"], s["identities"]) == (13233, 13233, 5749)
    assert s["splits"]["train"]["images"] == 9525 and s["splits"]["train"]["identities"] == 4038
    assert s["splits"]["test"]["images"] == 3708 and s["splits"]["test"]["identities"] == 1711
    assert s["identity_overlap_train_test"] == 0


def _linked_tree(root: Path, lfw_small: Path, names=("Alice", "Bob")) -> dict[str, list[str]]:
    """Identity folders of two real LFW faces each; returns identity -> its files (relative)."""
    src = sorted((lfw_small / "lfw-deepfunneled").iterdir())
    out = {}
    for name, person in zip(names, src):
        (root / name).mkdir(parents=True)
        for f in sorted(person.iterdir())[:2]:
            shutil.copyfile(f, root / name / f.name)
        out[name] = [f"{name}/{f.name}" for f in sorted((root / name).iterdir())]
    return out


def _ingest_folder(root: Path, out: Path) -> tuple[dict, dict[str, dict]]:
    s = run_ingest(params=IngestParams(), dataset=DatasetParams(source="imagefolder", path=str(root)),
                   compute=SERIAL, out_dir=out)
    rows = {r["source_path"]: r for r in manifest_rows(out)}
    assert s["inputs"] == len(rows) == s["accepted"] + s["rejected"]
    return s, rows


def _accepted(rows: dict[str, dict]) -> dict[str, str]:
    return {p: r["identity"] for p, r in rows.items() if r["status"] == "accepted"}


def test_link_loop_ends_and_each_file_is_ingested_once(tmp_path, lfw_small):
    root = tmp_path / "src"
    files = _linked_tree(root, lfw_small)
    (root / "Alice" / "up").symlink_to("..", target_is_directory=True)  # a cycle back to the root
    s, rows = _ingest_folder(root, tmp_path / "out")
    assert _accepted(rows) == {p: p.split("/")[0] for fs in files.values() for p in fs}
    link = rows["Alice/up"]
    assert link["status"] == "rejected" and s["rejected"] == 1
    assert link["reason"] == "folder link not followed: points inside the source (to .)"


def test_link_loops_at_the_top_of_the_source_are_rejected_rows(tmp_path, lfw_small):
    """`Self_Loop -> Self_Loop` and `A -> B -> A` right under the root crashed ingest (ELOOP)."""
    root = tmp_path / "src"
    files = _linked_tree(root, lfw_small)
    (root / "Self_Loop").symlink_to("Self_Loop")
    (root / "Loop_A").symlink_to("Loop_B")
    (root / "Loop_B").symlink_to("Loop_A")
    s, rows = _ingest_folder(root, tmp_path / "out")
    assert _accepted(rows) == {p: p.split("/")[0] for fs in files.values() for p in fs}
    for name in ("Self_Loop", "Loop_A", "Loop_B"):
        assert rows[name]["status"] == "rejected" and "link loop" in rows[name]["reason"], rows[name]
    assert s["rejected"] == 3


def test_link_to_a_sibling_identity_does_not_ingest_it_twice(tmp_path, lfw_small):
    root = tmp_path / "src"
    files = _linked_tree(root, lfw_small)
    (root / "Alice" / "more").symlink_to(root / "Bob", target_is_directory=True)
    bob_file = files["Bob"][0]
    (root / "Alice" / "bob.jpg").symlink_to(root / bob_file)
    s, rows = _ingest_folder(root, tmp_path / "out")
    assert _accepted(rows) == {p: p.split("/")[0] for fs in files.values() for p in fs}
    assert rows["Alice/more"]["reason"] == "folder link not followed: points inside the source (to Bob)"
    assert rows["Alice/bob.jpg"]["reason"] == (
        f"file link not listed: points inside the source (to {bob_file})")
    assert s["rejected"] == 2 and s["exact_duplicates"] == 0


def test_folder_links_out_of_the_source_are_rows_and_file_links_are_read(tmp_path, lfw_small):
    """Ingest reads what DVC hashes (test_pipeline_dvc: a change behind a file link reruns it): a
    subset of links to identity folders elsewhere is reported, one row each, never read; the same
    subset as folders of file links (`cp -rs`) is read, each real file once; the root may be a link."""
    elsewhere = tmp_path / "elsewhere"
    files = _linked_tree(elsewhere, lfw_small, names=("Carol", "Dave"))
    real_root = tmp_path / "subset"
    real_root.mkdir()
    (real_root / "Carol").symlink_to(elsewhere / "Carol", target_is_directory=True)
    (real_root / "Up").symlink_to(tmp_path, target_is_directory=True)  # holds the source
    (real_root / "Dave").mkdir()
    for f in files["Dave"]:
        (real_root / f).symlink_to(elsewhere / f)
    (real_root / "Dave" / "again.jpg").symlink_to(elsewhere / files["Dave"][0])
    root = tmp_path / "source_link"
    root.symlink_to(real_root, target_is_directory=True)
    s, rows = _ingest_folder(root, tmp_path / "out")
    assert _accepted(rows) == {f: "Dave" for f in files["Dave"]}
    assert rows["Carol"]["reason"] == (
        f"folder link not followed: points out of the source (to {elsewhere / 'Carol'}), where DVC does not "
        "look, so a change there would not rerun ingest: copy the folder in, or link its files (cp -rs)")
    assert rows["Up"]["reason"] == f"folder link not followed: points to {tmp_path}, which holds the source (a cycle)"
    assert rows["Dave/again.jpg"]["reason"] == f"not listed: same file as {files['Dave'][0]}"
    assert s["identities"] == 1 and s["rejected"] == 3


def test_lfw_people_file_is_read_by_the_protocol_parser(tmp_path, lfw_small):
    from pipeline.data import ingest, protocols

    assert ingest.read_people is protocols.read_people and not hasattr(ingest, "read_people_list")
    root = tmp_path / "lfw"
    (root / "lfw-deepfunneled").mkdir(parents=True)
    shutil.copyfile(lfw_small / "peopleDevTest.txt", root / "peopleDevTest.txt")
    lines = (lfw_small / "peopleDevTrain.txt").read_text().splitlines()
    (root / "peopleDevTrain.txt").write_text("\n".join(lines[:-1]) + "\n")  # one name short
    with pytest.raises(IngestError, match="promises 6 names, found 5"):
        run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(root)), compute=SERIAL, out_dir=tmp_path / "o")


def test_accepted_image_ids(tmp_path, lfw_small):
    from pipeline.data.ingest import accepted_image_ids

    assert accepted_image_ids(tmp_path) is None
    root = tmp_path / "src"
    _linked_tree(root, lfw_small)
    (root / "Alice" / "notes.jpg").write_bytes(b"not an image")
    run_ingest(params=IngestParams(), dataset=DatasetParams(source="imagefolder", path=str(root)),
               compute=SERIAL, out_dir=tmp_path / "out")
    ids = accepted_image_ids(tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert ids == sorted(r["image_id"] for r in rows if r["status"] == "accepted") and len(ids) == 4
    assert "Alice/notes" not in ids and len(rows) == 5


# ------------------------------------------------------------------------------------ streaming

def test_manifest_is_written_per_chunk_in_chunk_order(tmp_path, lfw_small):
    """One row group per chunk, as the chunks finish; rows in chunk order with ids sorted within a
    chunk, i.e. (split, image_id) order, the same whatever the chunk size."""
    from pipeline.data.ingest import accepted_ids_by_chunk

    lfw = DatasetParams(path=str(lfw_small))
    run_ingest(params=IngestParams(chunk_size=7), dataset=lfw, compute=ComputeParams(n_jobs=2), out_dir=tmp_path / "a")
    f = pq.ParquetFile(tmp_path / "a" / "manifest.parquet")
    chunks = list_chunks(tmp_path / "a" / "chunks")
    assert f.num_row_groups == len(chunks) > 3
    groups = [f.read_row_group(i).to_pylist() for i in range(f.num_row_groups)]
    for chunk, rows in zip(chunks, groups):
        assert {r["chunk"] for r in rows} == {chunk.name}
        assert [r["image_id"] for r in rows] == [k for k, _ in read_chunk(chunk)] == sorted(r["image_id"] for r in rows)
    rows = [r for g in groups for r in g]
    assert [(r["split"], r["image_id"]) for r in rows] == sorted((r["split"], r["image_id"]) for r in rows)
    run_ingest(params=IngestParams(chunk_size=15), dataset=lfw, compute=SERIAL, out_dir=tmp_path / "b")
    other = manifest_rows(tmp_path / "b")
    assert [r["image_id"] for r in other] == [r["image_id"] for r in rows]
    # what later stages check their chunks against: the accepted ids per chunk, streamed
    runs = list(accepted_ids_by_chunk(tmp_path / "a", batch_size=5))
    assert runs == [(c.name, [k for k, _ in read_chunk(c)]) for c in chunks]
    assert accepted_ids_by_chunk(tmp_path / "nowhere") is None


def test_duplicates_found_across_chunks_without_holding_rows(tmp_path, lfw_small):
    """Exact duplicates in different chunks: each copy points at the first id (by image_id)."""
    root = tmp_path / "src"
    files = _linked_tree(root, lfw_small, names=("Alice", "Bob", "Carol"))
    face = (root / files["Alice"][0]).read_bytes()
    (root / "Bob" / "copy.jpg").write_bytes(face)
    (root / "Carol" / "copy.jpg").write_bytes(face)
    s = run_ingest(params=IngestParams(chunk_size=1), dataset=DatasetParams(source="imagefolder", path=str(root)),
                   compute=ComputeParams(n_jobs=2), out_dir=tmp_path / "out")
    rows = {r["image_id"]: r for r in manifest_rows(tmp_path / "out")}
    first = files["Alice"][0].rsplit(".", 1)[0]
    assert {i: r["duplicate_of"] for i, r in rows.items() if r["duplicate_of"]} == {"Bob/copy": first,
                                                                                  "Carol/copy": first}
    assert s["exact_duplicates"] == 2 and pq.ParquetFile(tmp_path / "out" / "manifest.parquet").num_row_groups == 8
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_lost_row_is_an_accounting_error(tmp_path, lfw_small, monkeypatch):
    from pipeline.data import ingest

    real = ingest.ingest_chunk
    monkeypatch.setattr(ingest, "ingest_chunk", lambda job, **kw: real(job, **kw)[1:])  # drop a row per chunk
    with pytest.raises(IngestError, match="accounting broken"):
        run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(lfw_small)), compute=SERIAL,
                   out_dir=tmp_path / "o")
