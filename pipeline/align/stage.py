"""The align stage: every ingested image and its masked twin -> a pixel-aligned pair of crops on the template (align.template).

Reads data/ingest (raw images) and data/masked (masked twins + dlib landmarks), works chunk by
chunk through :func:`pipeline.parallel.map_chunks`, and writes ``chunks/<same name>.tar`` with
``raw.jpg``, ``masked.jpg`` and ``json`` per image, ``status.parquet`` (one row per ingested
image: route, eyes found, alignment error against the dlib eyes, reason), ``summary.json`` and
``contact_sheet.png``. The stage asserts aligned + rejected = ingested.

The parent streams: each chunk's status rows are checked against the ingest manifest, appended to
``status.parquet`` (chunk order, ids sorted within a chunk: see :mod:`pipeline.stage_report`),
counted into the summary and offered to the contact-sheet picks, then dropped. The only per-image
state kept is one float per aligned image with a dlib eye error (8 bytes, for the exact median and
p95 in summary.json). A task carries its chunk's name only: a worker looks up the mask stage's
reason for an image without a twin in ``status.parquet`` itself.
"""
from __future__ import annotations

import json
import shutil
from array import array
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.align import detection as al
from pipeline.align import geometry as geo
from pipeline.config import AlignParams, ComputeParams, StandaloneParams
from pipeline.data.ingest import accepted_ids_by_chunk
from pipeline.data.images import apply_overlay, decode_gray, decode_rgb, encode_jpeg
from pipeline.parallel import iter_chunks
from pipeline.seeding import rank_key
from pipeline.stage_report import (Accounting, SmallestK, StatusCounts, collect_chunk_rows, draw_sheet,
                                   write_png)
from pipeline.data.tar_chunks import dumps_json, list_chunks, read_chunk, record_chunks, write_chunk, write_json

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
    t = geo.get_template(params.template)
    est = al.pre_aligned(raw, t) if assume_aligned \
        else al.estimate_pair_transform(raw, landmarks, method=params.method, template=t)
    if est.matrix is None:
        return {"route": est.route, "reason": est.reason}
    # a pre-aligned crop on its own template: no resampling at all, the pixels stay the source's
    same = est.route == "pre_aligned" and raw.shape[0] == t.size
    out = {"route": est.route, "reason": "", "matrix": est.matrix, "eyes": est.eyes,
           "raw": raw if same else geo.warp(raw, est.matrix, t.size),
           "masked": masked if same else geo.warp(masked, est.matrix, t.size),
           "eye_error_px": geo.eye_error_px(est.matrix, landmarks, t) if landmarks is not None else None,
           "mask_lower_share": None}
    if mask is not None:  # measured in the ArcFace 112 frame whatever the template
        m = geo.warp(mask, geo.retarget(est.matrix, t, geo.ARCFACE_112), interpolation=cv2.INTER_NEAREST) > 127
        total = int(m.sum())
        out["mask_lower_share"] = float(m[geo.CROP_SIZE // 2:].sum() / total) if total else 0.0
    return out


def mask_reasons(mask_status: str | Path, image_ids: list[str]) -> dict[str, str]:
    """The mask stage's reason (or status) for each of ``image_ids`` it did not mask, read from its
    status table: only these ids' rows (a filtered read), so a task never carries the data set's."""
    if not image_ids:
        return {}
    t = pq.read_table(mask_status, columns=["image_id", "status", "reason"],
                      filters=[("image_id", "in", sorted(set(image_ids)))])
    return {i: r or s for i, s, r in zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "reason")))
            if s != "masked"}


def align_chunk(chunk_name: str, *, ingest_chunks: str, masked_chunks: str, mask_status: str,
                params: AlignParams, out_chunks: str, assume_aligned: bool = False,
                standalone: StandaloneParams | None = None) -> list[dict]:
    """Align every image of one ingest chunk; write out_chunks/<same name>; return status rows.
    A masked twin of a split in ``params.standalone_twin_splits`` is also aligned on its own by
    ``standalone`` (:func:`pipeline.align.detection.align_standalone`), as ``masked_standalone.jpg``;
    its json says the route (``standalone_route``, "none" when no face was found)."""
    twins: dict[str, dict[str, bytes]] = {}
    masked_path = Path(masked_chunks) / chunk_name
    if masked_path.is_file():
        twins = dict(read_chunk(masked_path))
    rows, samples, no_twin = [], [], []
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
            no_twin.append(row)
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
                "template": params.template,
                "eyes": None if res["eyes"] is None else [[round(v, 3) for v in e] for e in res["eyes"]],
                "matrix": [[round(float(v), 6) for v in r] for r in res["matrix"]]}
        members = {"raw.jpg": encode_jpeg(res["raw"], params.jpeg_quality),
                   "masked.jpg": encode_jpeg(res["masked"], params.jpeg_quality)}
        if row["split"] in params.standalone_twin_splits:
            own = al.align_standalone(masked, params=standalone, template=geo.get_template(params.template))
            info["standalone_route"] = row["standalone_route"] = own.route  # summary.json only
            if own.crop is not None:
                members[geo.STANDALONE_TWIN] = encode_jpeg(own.crop, params.jpeg_quality)
        samples.append((key, {**members, "json": dumps_json(info)}))
    reasons = mask_reasons(mask_status, [r["image_id"] for r in no_twin])
    for row in no_twin:
        why = reasons.get(row["image_id"], "not in the mask stage output")
        row["reason"] = f"no masked twin (mask stage: {why})"
    if samples:
        write_chunk(Path(out_chunks) / chunk_name, samples)
    return rows


class AlignSummary(StatusCounts):
    """summary.json from running counters; per image only the eye errors (one float each, for
    the exact median / p95) and the mask lower-half shares."""

    DONE = "aligned"

    def __init__(self, params: AlignParams):
        super().__init__()
        self.method, self.template = params.method, geo.get_template(params.template)
        self.twin_splits = params.standalone_twin_splits
        self.twin_routes: Counter = Counter()
        self.cascade = 0
        self.errs = array("d")
        self.err_routes: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # route -> [within 4 px, n]
        self.lower_n = self.lower_90 = 0
        self.lower_sum = 0.0

    def count_done(self, r: dict) -> None:
        self.cascade += r["route"] in al.ROUTES_CASCADE
        if "standalone_route" in r:
            self.twin_routes[r["standalone_route"]] += 1
        if r["eye_error_px"] is not None:
            self.errs.append(r["eye_error_px"])
            by_route = self.err_routes[r["route"]]
            by_route[0] += r["eye_error_px"] <= 4
            by_route[1] += 1
        if r["mask_lower_share"] is not None:
            self.lower_n += 1
            self.lower_sum += r["mask_lower_share"]
            self.lower_90 += r["mask_lower_share"] >= 0.9

    def result(self) -> dict:
        n = max(self.inputs, 1)
        errs = np.frombuffer(self.errs, dtype=np.float64) if len(self.errs) else np.zeros(0)
        twins = {"standalone_twins": {  # only when asked for: the default summary stays as it was
            "splits": self.twin_splits, "aligned_pairs": sum(self.twin_routes.values()),
            "no_face_found": self.twin_routes["none"], "routes": dict(sorted(self.twin_routes.items())),
            "note": "masked twins aligned on their own (masked_standalone.jpg); no face found: the pair's crop only"}} \
            if self.twin_splits else {}
        return {
            "method": self.method, "template": self.template.name, "crop_size": self.template.size,
            "inputs": self.inputs, "aligned": self.done, "rejected": self.inputs - self.done,
            "aligned_share": round(self.done / n, 6),
            "cascade_share": round(self.cascade / n, 6),
            "routes": dict(sorted(self.routes.items())),
            "rejection_reasons": dict(sorted(self.reasons.items())),
            "splits": self.split_counts(),
            "eye_error_px": {  # in ArcFace-112 pixels whatever the template
                "images": int(errs.size),
                "within_4px_share": round(float((errs <= 4).mean()), 6) if errs.size else None,
                "median": round(float(np.median(errs)), 4) if errs.size else None,
                "p95": round(float(np.percentile(errs, 95)), 4) if errs.size else None,
                "within_4px_share_by_route": {route: round(float(k / m), 6)
                                              for route, (k, m) in sorted(self.err_routes.items())},
            },
            "mask_lower_half": {
                "images": self.lower_n,
                "mean_share": round(float(self.lower_sum / self.lower_n), 6) if self.lower_n else None,
                "share_with_90pct_below": round(float(self.lower_90 / self.lower_n), 6) if self.lower_n else None,
            },
            **twins,
        }



class SheetPicks:
    """The contact sheet's pairs: a fixed pick by the smallest hash of the image id, at least two
    of each route first, SHEET_PAIRS in all; O(routes + SHEET_PAIRS) rows held."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.by_route: dict[str, SmallestK] = {}
        self.overall = SmallestK(SHEET_PAIRS)  # the rest come from the overall smallest

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            if r["status"] == "aligned":
                key = rank_key(self.seed, r["image_id"])
                self.by_route.setdefault(r["route"], SmallestK(2)).add(key, r)
                self.overall.add(key, r)

    def picks(self) -> list[dict]:
        picks: list[dict] = []
        for route in sorted(self.by_route):
            picks += self.by_route[route].items()
        chosen = {r["image_id"] for r in picks}
        picks += [r for r in self.overall.items() if r["image_id"] not in chosen][:max(0, SHEET_PAIRS - len(picks))]
        return sorted(picks[:SHEET_PAIRS], key=lambda r: r["image_id"])


def contact_sheet(picks: list[dict], out_dir: Path, template: geo.Template) -> np.ndarray:
    """Aligned pairs (raw | masked), a green dot on each template eye position so misalignment
    shows at a glance (``picks`` from :class:`SheetPicks`)."""
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
            for ex, ey in template.eyes:  # a green dot on each template eye position
                cv2.circle(tile, (int(round(ex)), int(round(ey))), 1, (0, 255, 0), -1)
            tiles.append(tile)
        cells.append((f"{r['image_id'].split('/')[-1][:22]} {r['route']}", tiles))
    return draw_sheet([cells[i:i + SHEET_COLS] for i in range(0, len(cells), SHEET_COLS)], template.size,
                      font_scale=0.32)


def run_align(*, params: AlignParams, compute: ComputeParams, ingest_dir: str | Path, masked_dir: str | Path,
              out_dir: str | Path, assume_aligned: bool = False, standalone: StandaloneParams | None = None) -> dict:
    """Align every ingested image with its masked twin; write chunks/, status.parquet,
    summary.json and contact_sheet.png to out_dir; return the summary. ``assume_aligned`` (the
    data set's flag): ArcFace 112x112 crops pass through (mapped onto another template when asked).
    ``standalone``: how the masked twins of ``params.standalone_twin_splits`` are aligned on their
    own (default: the standalone section's defaults)."""
    ingest_dir, masked_dir, out_dir = Path(ingest_dir), Path(masked_dir), Path(out_dir)
    chunks = list_chunks(ingest_dir / "chunks")
    if not chunks:
        raise AlignStageError(f"no ingest chunks in {ingest_dir / 'chunks'} (run the ingest stage first)")
    mask_status = masked_dir / "status.parquet"
    if not mask_status.is_file():
        raise AlignStageError(f"{mask_status} not found: run the mask stage first")
    list_chunks(masked_dir / "chunks")  # the twins' chunks as the mask stage recorded them
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "chunks").mkdir(parents=True)
    accounting = Accounting(accepted_ids_by_chunk(ingest_dir), "aligned", AlignStageError)
    summary, picks = AlignSummary(params), SheetPicks()
    results = iter_chunks(align_chunk, [c.name for c in chunks], compute, desc="align", assume_aligned=assume_aligned,
                          ingest_chunks=str(ingest_dir / "chunks"), masked_chunks=str(masked_dir / "chunks"),
                          mask_status=str(mask_status), params=params, out_chunks=str(out_dir / "chunks"),
                          standalone=standalone or StandaloneParams())
    collect_chunk_rows(chunks, results, accounting=accounting, status_path=out_dir / "status.parquet",
                       schema=STATUS_SCHEMA, on_rows=lambda _chunk, rows: (summary.add(rows), picks.add(rows)))
    record_chunks(out_dir / "chunks")
    result = summary.result()
    write_json(out_dir / "summary.json", result)
    write_png(out_dir / "contact_sheet.png", contact_sheet(picks.picks(), out_dir, geo.get_template(params.template)))
    return result
