"""Fit pipeline.align.geometry.HAAR_TO_DLIB_BOX: where dlib's HOG face box lies inside the Haar face
box of the same face (shares of the Haar box's width and height), the conversion the mask stage's
Haar route uses to give dlib's 68-point predictor the box it was trained on.

On LFW's View 1 TRAIN people only (peopleDevTrain.txt), every ``--every``-th photo in which HOG
(upsample 0) finds exactly one face: the subject of the Haar face search the alignment and the mask
stage share (pipeline.align.detection.detect_faces), kept when its centre is within 0.3 box widths
of HOG's. Prints ONE JSON line: the medians (x0, y0, x1, y1) to paste, their median absolute
deviation, and the photos used. About a minute on one core:
  python scripts/calibrate_haar_box.py [--lfw data/sources/lfw] [--every 4]

What it gave: 2,279 photos with one HOG face, 2,276 with a Haar face on it; medians (0.077, 0.164,
0.975, 1.037), median absolute deviations (0.037, 0.055, 0.041, 0.043). The shrink the mask stage
used before, (0.1, 0.2, 0.9, 1.0) on its own cascade's boxes, was a guess 0.075 of a box too narrow.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import dlib
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import detection as al  # noqa: E402
from pipeline.align.geometry import box_from_rect  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.data.protocols import read_people  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default="data/sources/lfw")
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    lfw = Path(args.lfw)
    photos = [p for name in sorted(read_people(lfw / "peopleDevTrain.txt"))
              for p in sorted((lfw / "lfw-deepfunneled" / name).glob("*.jpg"))]
    hog = dlib.get_frontal_face_detector()
    rel, single = [], 0
    for path in tqdm(photos[::args.every], desc="photos"):
        rgb = decode_rgb(path.read_bytes())
        rects = hog(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 0)
        if len(rects) != 1:
            continue
        single += 1
        x0, y0, x1, y1 = box_from_rect(rects[0])
        faces = al.detect_faces(al.cascade_gray(rgb))
        if faces:
            x, y, w, h = faces[0]
            if abs(x + w / 2 - (x0 + x1) / 2) < 0.3 * w:
                rel.append([(x0 - x) / w, (y0 - y) / h, (x1 - x) / w, (y1 - y) / h])
    rel = np.array(rel)
    median = np.median(rel, axis=0)
    print(json.dumps({"people": "View 1 train (peopleDevTrain.txt)", "photos_one_hog_face": single,
                      "with_haar_face": len(rel), "haar_to_dlib_box": median.round(3).tolist(),
                      "mad": np.median(np.abs(rel - median), axis=0).round(3).tolist()}))


if __name__ == "__main__":
    main()
