"""Where RetinaFace's five points land, on average, in the crop that dlib's five points (the
training crops' `landmarks5` route) make: the offsets a calibration onto the training geometry
would use (aligning RetinaFace's points onto template + offset), and what they would buy.
docs/photos-without-a-twin.md says why standalone alignment does without them: the offsets on
unmasked faces are small, and a mask shifts the points by more, differently.

Fits on the train split (raw photos), reports the test split (other people), raw and with the
synthetic mask on (the probe case): per point the mean offset, and the share of images whose
aligned eyes land within 4 ArcFace-112 px of where dlib's alignment puts them, before and after.
Run after `make repro` (needs the ingest and mask stages' outputs); prints ONE JSON line:
  python scripts/calibrate_retinaface.py [--dataset lfw] [--per-split 600] [--n-jobs 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import geometry as geo  # noqa: E402
from pipeline.align import retinaface as rf  # noqa: E402
from pipeline.data.images import apply_overlay, decode_rgb  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402


def detect_chunk(job: tuple[str, str, int]) -> list[dict]:
    """Per image (at most ``limit`` per chunk): split, dlib's 5 points and RetinaFace's on the raw
    and on the masked photo, all mapped into the ArcFace-112 crop of dlib's 5-point alignment."""
    ingest_chunk, masked_chunk, limit = job
    cv2.setNumThreads(1)
    twins = dict(read_chunk(masked_chunk))
    out = []
    for key, m in read_chunk(ingest_chunk):
        twin = twins.get(key)
        meta = json.loads(twin["json"]) if twin else {}
        if len(meta.get("landmarks") or []) != 68 or "overlay.png" not in twin:
            continue
        raw = decode_rgb(m.get("jpg", m.get("png")))
        masked = apply_overlay(raw, meta["overlay_box"], decode_rgb(twin["overlay.png"]))
        dlib5 = geo.five_points_from_landmarks(np.asarray(meta["landmarks"], float))
        to_crop = geo.umeyama_similarity(dlib5, geo.TEMPLATE_5)
        row = {"split": meta.get("split", ""), "dlib": geo.apply_matrix(to_crop, dlib5)}
        for name, image in (("raw", raw), ("masked", masked)):
            faces = rf.detect(image)
            centre = dlib5.mean(0)
            # the face dlib found: the detection whose points lie nearest to dlib's
            best = min(faces, key=lambda f: np.linalg.norm(f.points.mean(0) - centre), default=None)
            row[name] = None if best is None else geo.apply_matrix(to_crop, best.points)
        out.append(row)
        if len(out) >= limit:
            break
    return out


def eye_within_4px(points: list[np.ndarray], dlib: list[np.ndarray], offsets: np.ndarray) -> float:
    """Share of images whose RetinaFace alignment (onto template + offsets) puts dlib's eye centres
    within 4 px of the template eyes."""
    ok = []
    for p, d in zip(points, dlib):
        m = geo.umeyama_similarity(p, geo.TEMPLATE_5 + offsets)
        ok.append(np.linalg.norm(geo.apply_matrix(m, d[:2]) - geo.TEMPLATE_EYES, axis=1).max() <= 4)
    return round(float(np.mean(ok)), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="lfw")
    ap.add_argument("--per-split", type=int, default=600, help="images per split (spread over the chunks)")
    ap.add_argument("--n-jobs", type=int, default=2)
    args = ap.parse_args()
    ingest = list_chunks(Path("data") / args.dataset / "ingest" / "chunks")
    masked = Path("data") / args.dataset / "masked" / "chunks"
    jobs = []
    for split in ("train", "test"):
        chunks = [c for c in ingest if c.name.startswith(split + "-")]
        jobs += [(str(c), str(masked / c.name), -(-args.per_split // len(chunks))) for c in chunks]
    with Pool(args.n_jobs) as pool:
        rows = [r for part in tqdm(pool.imap(detect_chunk, jobs), total=len(jobs), desc="detect") for r in part]
    report = {}
    fit = [r for r in rows if r["split"] == "train" and r["raw"] is not None]
    offsets = np.median(np.stack([r["raw"] - r["dlib"] for r in fit]), axis=0)
    report["offsets_arcface112_px"] = np.round(offsets, 2).tolist()
    report["fit_images"] = len(fit)
    for split in ("train", "test"):
        for kind in ("raw", "masked"):
            sel = [r for r in rows if r["split"] == split]
            found = [r for r in sel if r[kind] is not None]
            pts, dl = [r[kind] for r in found], [r["dlib"] for r in found]
            err = np.stack([p - d for p, d in zip(pts, dl)])
            report[f"{split}_{kind}"] = {
                "images": len(sel), "found": len(found),
                "median_offset_px": np.round(np.median(err, 0), 2).tolist(),
                "eyes_within_4px_uncalibrated": eye_within_4px(pts, dl, np.zeros((5, 2))),
                "eyes_within_4px_calibrated": eye_within_4px(pts, dl, offsets)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
