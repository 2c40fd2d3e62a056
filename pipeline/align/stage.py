"""The align stage: every ingested image and its masked twin -> a pixel-aligned 112x112 pair.

Reads data/ingest (raw images) and data/masked (masked twins + dlib landmarks), works chunk by
chunk through :func:`pipeline.parallel.map_chunks`, and writes ``chunks/<same name>.tar`` with
``raw.jpg``, ``masked.jpg`` and ``json`` per image, ``status.parquet`` (one row per ingested
image: route, eyes found, alignment error against the dlib eyes, reason), ``summary.json`` and
``contact_sheet.png``. The stage asserts aligned + rejected = ingested.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.align import detection as al
from pipeline.align import geometry as geo
from pipeline.config import AlignParams, ComputeParams
from pipeline.ingest import accepted_image_ids
from pipeline.images import decode_gray, decode_rgb, encode_jpeg
from pipeline.mask.overlay import apply_overlay
from pipeline.parallel import map_chunks
from pipeline.seeding import rank_key
from pipeline.stage_report import check_accounting, draw_sheet, write_png, write_status
from pipeline.tar_chunks import dumps_json, list_chunks, read_chunk, write_chunk, write_json

STATUS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("identity", pa.string()), ("split", pa.string()),
    ("chunk", pa.string()), ("status", pa.string()), ("route", pa.string()), ("reason", pa.string()),
    ("eye_left_x", pa.float64()), ("eye_left_y", pa.float64()),
    ("eye_right_x", pa.float64()), ("eye_right_y", pa.float64()),
    # Largest distance (crop px) of the mapped dlib eye centres from the template eyes.
    ("eye_error_px", pa.float64()),
    # Share of the warped mask's pixels in the lower half of the crop.
    ("mask_lower_share", pa.float64()),
])
HALF = geo.CROP_SIZE // 2
SHEET_PAIRS = 24
SHEET_COLS = 6


class AlignStageError(RuntimeError):
    pass


def align_pair(raw: np.ndarray, masked: np.ndarray, mask: np.ndarray | None, landmarks: np.ndarray | None,
               params: AlignParams, assume_aligned: bool = False) -> dict:
    """One pair: the transform from the raw image, applied to raw, masked twin and binary mask.
    ``assume_aligned``: the crop passes through unchanged (route ``pre_aligned``)."""
    if raw.shape != masked.shape:
        return {"route": "none", "reason": f"masked twin {masked.shape} differs in size from raw {raw.shape}"}
    est = al.pre_aligned(raw) if assume_aligned else al.estimate_pair_transform(raw, landmarks, method=params.method)
    if est.matrix is None:
        return {"route": est.route, "reason": est.reason}
    same = est.route == "pre_aligned"  # no resampling at all: the pixels stay the source's
    out = {"route": est.route, "reason": "", "matrix": est.matrix, "eyes": est.eyes,
           "raw": raw if same else geo.warp(raw, est.matrix), "masked": masked if same else geo.warp(masked, est.matrix),
           "eye_error_px": geo.eye_error_px(est.matrix, landmarks) if landmarks is not None else None,
           "mask_lower_share": None}
    if mask is not None:
        m = geo.warp(mask, est.matrix, interpolation=cv2.INTER_NEAREST) > 127
        total = int(m.sum())
        out["mask_lower_share"] = float(m[HALF:].sum() / total) if total else 0.0
    return out


def align_chunk(chunk_name: str, *, ingest_chunks: str, masked_chunks: str, mask_reasons: dict[str, str],
                params: AlignParams, out_chunks: str, assume_aligned: bool = False) -> list[dict]:
    """Align every image of one ingest chunk; write out_chunks/<same name>; return status rows."""
    twins: dict[str, dict[str, bytes]] = {}
    masked_path = Path(masked_chunks) / chunk_name
    if masked_path.is_file():
        twins = dict(read_chunk(masked_path))
    rows, samples = [], []
    for key, members in read_chunk(Path(ingest_chunks) / chunk_name):
        meta = json.loads(members.get("json", b"{}"))
        image_id = meta.get("image_id", key)
        row = {"image_id": image_id, "identity": meta.get("identity", ""), "split": meta.get("split", ""),
               "chunk": chunk_name, "status": "rejected", "route": "none", "reason": "",
               "eye_left_x": None, "eye_left_y": None, "eye_right_x": None, "eye_right_y": None,
               "eye_error_px": None, "mask_lower_share": None}
        rows.append(row)
        twin = twins.get(key)
        if twin is None:
            why = mask_reasons.get(image_id, "not in the mask stage output")
            row["reason"] = f"no masked twin (mask stage: {why})"
            continue
        data = members.get("jpg", members.get("png"))
        raw = decode_rgb(data) if data else None
        tmeta = json.loads(twin.get("json", b"{}"))
        patch = decode_rgb(twin["overlay.png"]) if "overlay.png" in twin else None
        if raw is None or patch is None or "overlay_box" not in tmeta:
            row["reason"] = "raw image or mask overlay not decodable"
            continue
        # the masked twin from the raw photo's own pixels plus the lossless overlay: both twins
        # are encoded once below, so they are identical outside the mask
        masked = apply_overlay(raw, tmeta["overlay_box"], patch)
        mask = decode_gray(twin["mask.png"]) if "mask.png" in twin else None
        landmarks = np.asarray(tmeta["landmarks"], dtype=np.float64) \
            if len(tmeta.get("landmarks") or []) == 68 else None
        res = align_pair(raw, masked, mask, landmarks, params, assume_aligned)
        row.update(route=res["route"], reason=res["reason"])
        if "matrix" not in res:
            continue
        if res["eyes"] is not None:
            (lx, ly), (rx, ry) = res["eyes"]
            row.update(eye_left_x=lx, eye_left_y=ly, eye_right_x=rx, eye_right_y=ry)
        row.update(status="aligned", eye_error_px=res["eye_error_px"], mask_lower_share=res["mask_lower_share"])
        info = {"image_id": image_id, "identity": row["identity"], "split": row["split"], "route": res["route"],
                "eyes": None if res["eyes"] is None else [[round(v, 3) for v in e] for e in res["eyes"]],
                "matrix": [[round(float(v), 6) for v in r] for r in res["matrix"]]}
        samples.append((key, {"raw.jpg": encode_jpeg(res["raw"], params.jpeg_quality),
                              "masked.jpg": encode_jpeg(res["masked"], params.jpeg_quality),
                              "json": dumps_json(info)}))
    if samples:
        write_chunk(Path(out_chunks) / chunk_name, samples)
    return rows


def summarize(rows: list[dict], params: AlignParams) -> dict:
    aligned = [r for r in rows if r["status"] == "aligned"]
    errs = np.array([r["eye_error_px"] for r in aligned if r["eye_error_px"] is not None])
    lower = np.array([r["mask_lower_share"] for r in aligned if r["mask_lower_share"] is not None])
    n = max(len(rows), 1)
    splits = {}
    for split in sorted({r["split"] for r in rows}):
        rs = [r for r in rows if r["split"] == split]
        splits[split] = {"images": len(rs), "aligned": sum(r["status"] == "aligned" for r in rs)}
    return {
        "method": params.method,
        "inputs": len(rows), "aligned": len(aligned), "rejected": len(rows) - len(aligned),
        "aligned_share": round(len(aligned) / n, 6),
        "cascade_share": round(sum(r["route"] in al.ROUTES_CASCADE for r in aligned) / n, 6),
        "routes": dict(sorted(Counter(r["route"] for r in aligned).items())),
        "rejection_reasons": dict(sorted(Counter(r["reason"] for r in rows if r["status"] != "aligned").items())),
        "splits": splits,
        "eye_error_px": {
            "images": int(errs.size),
            "within_4px_share": round(float((errs <= 4).mean()), 6) if errs.size else None,
            "median": round(float(np.median(errs)), 4) if errs.size else None,
            "p95": round(float(np.percentile(errs, 95)), 4) if errs.size else None,
            "within_4px_share_by_route": {
                route: round(float(np.mean([r["eye_error_px"] <= 4 for r in aligned
                                            if r["route"] == route and r["eye_error_px"] is not None])), 6)
                for route in sorted({r["route"] for r in aligned if r["eye_error_px"] is not None})},
        },
        "mask_lower_half": {
            "images": int(lower.size),
            "mean_share": round(float(lower.mean()), 6) if lower.size else None,
            "share_with_90pct_below": round(float((lower >= 0.9).mean()), 6) if lower.size else None,
        },
    }


def contact_sheet(rows: list[dict], out_dir: Path, seed: int = 0) -> np.ndarray:
    """Aligned pairs (raw | masked), a green dot on each template eye position so misalignment
    shows at a glance. A fixed pick (smallest hash of the image id), every route represented."""
    aligned = [r for r in rows if r["status"] == "aligned"]
    ranked = sorted(aligned, key=lambda r: rank_key(seed, r["image_id"]))
    picks: list[dict] = []
    for route in sorted({r["route"] for r in aligned}):  # at least two of each route first
        picks += [r for r in ranked if r["route"] == route][:2]
    picks += [r for r in ranked if r not in picks][:max(0, SHEET_PAIRS - len(picks))]
    picks = sorted(picks[:SHEET_PAIRS], key=lambda r: r["image_id"])
    wanted = {r["image_id"]: r for r in picks}
    crops: dict[str, dict[str, bytes]] = {}
    for chunk in sorted({r["chunk"] for r in picks}):
        for key, members in read_chunk(out_dir / "chunks" / chunk):
            if key in wanted:
                crops[key] = members
    cells = []
    for r in picks:
        tiles = []
        for ext in ("raw.jpg", "masked.jpg"):
            tile = decode_rgb(crops[r["image_id"]][ext])
            for ex, ey in geo.TEMPLATE_EYES:  # a green dot on each template eye position
                cv2.circle(tile, (int(round(ex)), int(round(ey))), 1, (0, 255, 0), -1)
            tiles.append(tile)
        cells.append((f"{r['image_id'].split('/')[-1][:22]} {r['route']}", tiles))
    return draw_sheet([cells[i:i + SHEET_COLS] for i in range(0, len(cells), SHEET_COLS)], geo.CROP_SIZE,
                      font_scale=0.32)


def _mask_reasons(masked_dir: Path) -> dict[str, str]:
    status = masked_dir / "status.parquet"
    if not status.is_file():
        raise AlignStageError(f"{status} not found: run the mask stage first")
    t = pq.read_table(status, columns=["image_id", "status", "reason"]).to_pylist()
    return {r["image_id"]: r["reason"] or r["status"] for r in t if r["status"] != "masked"}


def run_align(*, params: AlignParams, compute: ComputeParams, ingest_dir: str | Path, masked_dir: str | Path,
              out_dir: str | Path, assume_aligned: bool = False) -> dict:
    """Align every ingested image with its masked twin; write chunks/, status.parquet,
    summary.json and contact_sheet.png to out_dir; return the summary. ``assume_aligned`` (the
    data set's flag): 112x112 crops pass through unchanged."""
    ingest_dir, masked_dir, out_dir = Path(ingest_dir), Path(masked_dir), Path(out_dir)
    chunks = list_chunks(ingest_dir / "chunks")
    if not chunks:
        raise AlignStageError(f"no ingest chunks in {ingest_dir / 'chunks'} (run the ingest stage first)")
    mask_reasons = _mask_reasons(masked_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "chunks").mkdir(parents=True)
    results = map_chunks(align_chunk, [c.name for c in chunks], compute, desc="align", assume_aligned=assume_aligned,
                         ingest_chunks=str(ingest_dir / "chunks"), masked_chunks=str(masked_dir / "chunks"),
                         mask_reasons=mask_reasons, params=params, out_chunks=str(out_dir / "chunks"))
    rows = sorted((r for chunk_rows in results for r in chunk_rows), key=lambda r: r["image_id"])
    check_accounting(rows, accepted_image_ids(ingest_dir), "aligned", AlignStageError)
    write_status(rows, STATUS_SCHEMA, out_dir / "status.parquet")
    summary = summarize(rows, params)
    write_json(out_dir / "summary.json", summary)
    write_png(out_dir / "contact_sheet.png", contact_sheet(rows, out_dir))
    return summary
