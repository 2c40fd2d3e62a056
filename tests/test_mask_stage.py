"""The mask stage end to end on real LFW images: format, accounting, rejections, determinism."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ComputeParams, DatasetParams, IngestParams, MaskParams, parse_params
from pipeline.data.ingest import run_ingest
from pipeline.data.images import apply_overlay, decode_rgb
from pipeline.mask.landmarks import LandmarkModelError
from pipeline.mask.stage import choose_style, image_rng, run_mask
from pipeline.stage_report import status_rows
from pipeline.data.tar_chunks import UnsafeArchiveError, list_chunks, read_chunk
from tests.conftest import tree_hashes
from tests.test_mask_landmarks import lfw_rgb

SERIAL = ComputeParams(n_jobs=1)


def ingest_into(src, out, chunk_size=16, source="lfw"):
    run_ingest(params=IngestParams(chunk_size=chunk_size), dataset=DatasetParams(source=source, path=str(src)),
               compute=SERIAL,
               out_dir=out)
    return out


@pytest.fixture(scope="module")
def ingested(lfw_small, tmp_path_factory):
    return ingest_into(lfw_small, tmp_path_factory.mktemp("mask_in") / "ingest")


@pytest.fixture(scope="module")
def masked(ingested, tmp_path_factory):
    out = tmp_path_factory.mktemp("mask_out") / "masked"
    summary = run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingested, out_dir=out)
    return out, summary


def test_outputs_follow_the_documented_format(ingested, masked):
    out, summary = masked
    assert [p.name for p in list_chunks(out / "chunks")] == [p.name for p in list_chunks(ingested / "chunks")]
    rows = status_rows(out)
    assert list(rows[0]) == ["image_id", "identity", "split", "status", "route", "mask_type", "colour",
                             "texture", "reason"]
    masked_ids = {r["image_id"] for r in rows if r["status"] == "masked"}
    raw = {k: m for c in list_chunks(ingested / "chunks") for k, m in read_chunk(c)}
    seen = set()
    for chunk in list_chunks(out / "chunks"):
        for key, members in read_chunk(chunk):
            seen.add(key)
            assert sorted(members) == ["json", "mask.png", "overlay.png"]  # lossless: no JPEG generation
            info = json.loads(members["json"])
            assert {"image_id", "identity", "split", "route", "landmarks", "mask_type", "colour", "texture",
                    "face_box", "overlay_box"} <= set(info)
            assert info["image_id"] == key and len(info["landmarks"]) == 68
            src = decode_rgb(raw[key]["jpg"])
            img = apply_overlay(src, info["overlay_box"], decode_rgb(members["overlay.png"]))
            mask = cv2.imdecode(np.frombuffer(members["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.shape == src.shape and mask.shape == src.shape[:2] and mask.dtype == np.uint8
            # the overlay box holds the mask; outside it the masked twin IS the raw photo
            x0, y0, x1, y1 = info["overlay_box"]
            assert mask[y0:y1, x0:x1].sum() == mask.sum() and (img != src).any()
            assert set(np.unique(mask)) == {0, 255}
            assert 0.05 < (mask > 0).mean() < 0.5
    assert seen == masked_ids
    # every ingested image is accounted for; routes add up; LFW masks on a landmark route
    assert summary["inputs"] == len(raw) == len(rows) == summary["masked"] + summary["rejected"]
    assert sum(summary["routes"].values()) == summary["masked"]
    assert summary["landmark_route_share"] >= 0.98
    assert (out / "contact_sheet.png").stat().st_size > 10_000


def test_outputs_are_byte_identical_across_runs_workers_and_dask(ingested, masked, tmp_path):
    out, _ = masked
    reference = tree_hashes(out)
    assert len(reference) > 4
    again = run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == reference and again == masked[1]
    run_mask(params=MaskParams(), compute=ComputeParams(n_jobs=2), in_dir=ingested, out_dir=tmp_path / "two")
    assert tree_hashes(tmp_path / "two") == reference
    run_mask(params=MaskParams(), compute=ComputeParams(backend="dask", n_jobs=2), in_dir=ingested,
             out_dir=tmp_path / "dask")
    assert tree_hashes(tmp_path / "dask") == reference


def test_per_image_results_do_not_depend_on_chunking(lfw_small, masked, tmp_path):
    ingest2 = ingest_into(lfw_small, tmp_path / "ingest", chunk_size=7)
    run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingest2, out_dir=tmp_path / "m")
    assert status_rows(tmp_path / "m") == status_rows(masked[0])

    def samples(folder):
        return {k: m for c in list_chunks(folder / "chunks") for k, m in read_chunk(c)}
    assert samples(tmp_path / "m") == samples(masked[0] )


def test_style_is_seeded_by_image_and_weights_are_respected():
    p = MaskParams(seed=3)
    a = [choose_style(p, image_rng(3, f"id_{i}")) for i in range(200)]
    assert a == [choose_style(p, image_rng(3, f"id_{i}")) for i in range(200)]
    assert a != [choose_style(p, image_rng(4, f"id_{i}")) for i in range(200)]
    assert {s[0] for s in a} == {"surgical", "n95", "kn95", "cloth", "gas"}
    only = parse_params({"mask": {"type_weights": {"gas": 1.0}, "texture_weights": {"print": 1.0}}}).mask
    assert {choose_style(only, image_rng(0, f"id_{i}"))[::2] for i in range(50)} == {("gas", "print")}


def test_bad_inputs_get_documented_statuses(tmp_path):
    """A no-face image, a tiny image and a grey image are rejected with reasons, never dropped."""
    face = lfw_rgb("Aaron_Eckhart/Aaron_Eckhart_0001")
    root = tmp_path / "folder"
    images = {"person/face": face, "person/no_face": np.ascontiguousarray(face[180:]),
              "person/tiny": cv2.resize(face, (24, 24), interpolation=cv2.INTER_AREA),
              "person/grey": np.full((250, 250, 3), 128, np.uint8),
              "other/face2": lfw_rgb("Colin_Powell/Colin_Powell_0001")}
    for name, rgb in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    ingest = ingest_into(root, tmp_path / "ingest", source="imagefolder")
    summary = run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingest, out_dir=tmp_path / "m")
    rows = {r["image_id"]: r for r in status_rows(tmp_path / "m")}
    assert len(rows) == 5 and summary["masked"] == 2 and summary["rejected"] == 3
    assert rows["person/face"]["status"] == rows["other/face2"]["status"] == "masked"
    assert rows["person/no_face"]["reason"].startswith("no face found: dlib HOG")
    assert rows["person/tiny"]["reason"].startswith("image too small for face detection")
    assert rows["person/grey"]["reason"].startswith("no face found: blank image")
    for k in ("person/no_face", "person/tiny", "person/grey"):
        assert rows[k]["status"] == "rejected" and rows[k]["route"] == "" and rows[k]["mask_type"] == ""
    assert summary["rejection_reasons"] == {"image too small for face detection": 1, "no face found": 2}


def test_bad_predictor_path_fails_before_any_work(ingested, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(LandmarkModelError, match="not found"):
        run_mask(params=MaskParams(landmarks_dat=str(tmp_path / "missing.dat")), compute=SERIAL,
                 in_dir=ingested, out_dir=out)
    assert not out.exists()
    wrong = parse_params({"mask": {"landmarks_sha256": "0" * 64}}).mask
    with pytest.raises(LandmarkModelError, match="sha256"):
        run_mask(params=wrong, compute=SERIAL, in_dir=ingested, out_dir=out)
    assert not out.exists()


def test_status_is_written_and_checked_chunk_by_chunk(ingested, masked, tmp_path, monkeypatch):
    """One status row group per chunk, rows in chunk order (ids sorted within); a row lost in the
    second chunk stops the stage there, before the later chunks run, and leaves no status table."""
    import shutil

    from pipeline.mask import stage

    out, _ = masked
    f = pq.ParquetFile(out / "status.parquet")
    chunks = list_chunks(ingested / "chunks")
    assert f.num_row_groups == len(chunks) >= 4
    for i, chunk in enumerate(chunks):
        assert f.read_row_group(i).column("image_id").to_pylist() == [k for k, _ in read_chunk(chunk)]
    real, calls = stage.mask_chunk, []

    def lossy(path, **kw):
        calls.append(path)
        rows = real(path, **kw)
        return rows[:-1] if len(calls) == 2 else rows

    monkeypatch.setattr(stage, "mask_chunk", lossy)
    n = len(list(read_chunk(chunks[1])))
    with pytest.raises(stage.MaskStageError, match=rf"accounting broken in {chunks[1].name}: {n} ingested, {n - 1} status"):
        run_mask(params=MaskParams(), compute=SERIAL, in_dir=ingested, out_dir=tmp_path / "m")
    assert len(calls) == 2 < len(chunks) and not (tmp_path / "m" / "status.parquet").exists()
    # an ingest chunk gone missing: refused against ingest's chunks.json before any work
    monkeypatch.setattr(stage, "mask_chunk", real)
    shutil.copytree(ingested, tmp_path / "ingest")
    (tmp_path / "ingest" / "chunks" / chunks[0].name).unlink()
    with pytest.raises(UnsafeArchiveError, match=rf"chunks recorded but missing \['{chunks[0].name}'\]"):
        run_mask(params=MaskParams(), compute=SERIAL, in_dir=tmp_path / "ingest", out_dir=tmp_path / "m")
