"""Fit pipeline.align.detection.EYE_POSE_CORRECTION: the pose bias of Haar eye pairs, against dlib's eye
centres (mask stage landmarks). Fits on the train split, reports the test split (other people).

Run after `make repro` (needs data/lfw/ingest and data/lfw/masked); prints ONE JSON line with the matrix
to paste and the share of eye pairs within 4 px before and after, per split:
  python scripts/calibrate_eyes.py [--ingest data/lfw/ingest] [--masked data/lfw/masked] [--n-jobs 2]
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

from pipeline.align import detection as al  # noqa: E402
from pipeline.align import geometry as geo  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402

# Pairs off by more than this (face-box widths) are wrong detections, not bias: left out of the fit.
OUTLIER = 0.1


def detect_chunk(job: tuple[str, str]) -> list[tuple]:
    """(split, face box, uncalibrated Haar eyes, dlib eyes) of each image with both."""
    ingest_chunk, masked_chunk = job
    cv2.setNumThreads(1)
    landmarks = {}
    for key, m in read_chunk(masked_chunk):
        lm = json.loads(m["json"]).get("landmarks") or []
        if len(lm) == 68:
            landmarks[key] = np.stack(geo.eye_centres_from_landmarks(np.asarray(lm, float)))
    out = []
    for key, m in read_chunk(ingest_chunk):
        if key not in landmarks:
            continue
        res = al.cascade_detect(decode_rgb(m.get("jpg", m.get("png"))), calibrate=False)
        if res.eyes is not None:
            split = json.loads(m.get("json", b"{}")).get("split", "")
            out.append((split, np.asarray(res.face, float), np.asarray(res.eyes, float), landmarks[key]))
    return out


def within_4px(eyes: np.ndarray, dlib: np.ndarray) -> float:
    errs = [np.linalg.norm(geo.apply_matrix(geo.similarity_from_eyes(*e), d) - geo.TEMPLATE_EYES, axis=1).max()
            for e, d in zip(eyes, dlib)]
    return round(float(np.mean(np.asarray(errs) <= 4)), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest", default="data/lfw/ingest")
    ap.add_argument("--masked", default="data/lfw/masked")
    ap.add_argument("--n-jobs", type=int, default=2)
    args = ap.parse_args()
    jobs = [(str(c), str(Path(args.masked) / "chunks" / c.name)) for c in list_chunks(Path(args.ingest) / "chunks")]
    with Pool(args.n_jobs) as pool:
        rows = [r for rs in tqdm(pool.imap(detect_chunk, jobs), total=len(jobs), desc="haar eyes") for r in rs]
    split = np.array([r[0] for r in rows])
    faces, eyes, dlib = (np.stack([r[k] for r in rows]) for k in (1, 2, 3))
    x = np.stack([al.eye_pose_features(f, e) for f, e in zip(faces, eyes)])
    y = (dlib - eyes).reshape(-1, 4) / faces[:, 2:3]
    fit = (split == "train") & (np.abs(y).max(1) < OUTLIER)
    matrix = np.linalg.lstsq(x[fit], y[fit], rcond=None)[0].round(4)
    calibrated = eyes + (x @ matrix * faces[:, 2:3]).reshape(-1, 2, 2)
    report = {"matrix": matrix.tolist(), "fitted_on": int(fit.sum())}
    for name in ("train", "test"):
        s = split == name
        report[name] = {"eye_pairs": int(s.sum()), "within_4px_raw": within_4px(eyes[s], dlib[s]),
                        "within_4px_calibrated": within_4px(calibrated[s], dlib[s])}
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
