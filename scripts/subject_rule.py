"""Which face of a multi-face photo is its subject? The rules the project has used, measured on
LFW's View 1 TRAIN people only (peopleDevTrain.txt; never a test person).

Every train photo goes through dlib's HOG as the mask stage runs it (upsample 0, then 1 when
nothing is found), or with ``--detector retinaface`` through RetinaFace as standalone alignment,
the mask bank and the mask stage's fallback run it. On the photos with two or more faces each
rule picks one:

- ``subject``: :func:`pipeline.align.geometry.subject_index`, the project's one rule: the box
  centre nearest the photo's centre (scripts/dlib_geometry.py's rule before);
- ``area_linear``: area x (1 - 0.5 min(d, 1)), d the centre distance over half the short side
  (the mask stage's rule before);
- ``area_share_gauss``: area share x exp(-4 r^2), r the centre offset in image widths / heights
  (standalone alignment's and the Haar cascade's rule before);
- ``largest``: the largest box.

Which pick is right is read from identity, not from position (LFW's photos are cropped around
the named person, so the face nearest the centre would score the ``subject`` rule by
definition): the reference is the face whose dlib face descriptor is within 0.6 (dlib's
same-person distance) of the mean descriptor of the same person's single-face photos while
every other face of the photo is not; photos of people with no single-face photo, or with no
such one face, are left out.

One JSON line: photos, multi-face photos, how often the rules disagree, and per rule how often it
picks the reference face. About 5 min on 2 cores (RetinaFace: 10):
  python scripts/subject_rule.py [--lfw data/sources/lfw] [--detector hog|retinaface] [--n-jobs 2]

What it gave (9,525 train photos; subject / area_linear / area_share_gauss / largest):
- HOG: 41 photos without a face, 361 with two or more; the area rules never disagree with each
  other and differ from ``subject`` on 9; of the 225 the identity check decides, ``subject``
  picks the person on 225, the area rules on 219, the largest box on 196 (the person's face is
  not the largest on 29, down to 0.43 of the largest's area).
- RetinaFace: 1,979 with two or more (small faces behind the subject); ``subject`` and the area
  rules differ on 2; of the 1,102 decided, 1,102 / 1,102 / 1,102 / 1,081.
"""
from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import retinaface  # noqa: E402
from pipeline.align.geometry import box_from_rect, dlib_box_from_points, subject_index  # noqa: E402
from pipeline.dlib_models import FACE_RESNET, SHAPE_68, dlib_models_dir  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.data.protocols import read_people  # noqa: E402

SAME_PERSON = 0.6  # dlib's face-descriptor distance threshold for one person


def area_linear(boxes, w: int, h: int) -> int:
    cx, cy, half = w / 2.0, h / 2.0, 0.5 * min(w, h)
    score = [max(x1 - x0, 0) * max(y1 - y0, 0) * (1.0 - 0.5 * min(np.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy)
                                                                 / half, 1.0)) for x0, y0, x1, y1 in boxes]
    return int(np.argmax(score))


def area_share_gauss(boxes, w: int, h: int) -> int:
    def score(b):
        x0, y0, x1, y1 = b
        dx, dy = (x0 + x1) / 2 / w - 0.5, (y0 + y1) / 2 / h - 0.5
        return (x1 - x0) * (y1 - y0) / (w * h) * float(np.exp(-4.0 * (dx * dx + dy * dy)))
    return min(range(len(boxes)), key=lambda i: (-score(boxes[i]), tuple(boxes[i])))


def area(box) -> float:
    x0, y0, x1, y1 = box
    return max(x1 - x0, 0) * max(y1 - y0, 0)


def largest(boxes, w: int, h: int) -> int:
    return int(np.argmax([area(b) for b in boxes]))


RULES = {"subject": subject_index, "area_linear": area_linear, "area_share_gauss": area_share_gauss,
         "largest": largest}

_MODELS: dict = {}


def _models():
    import dlib

    if not _MODELS:
        _MODELS["hog"] = dlib.get_frontal_face_detector()
        _MODELS["sp"] = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_68))
        _MODELS["net"] = dlib.face_recognition_model_v1(str(dlib_models_dir() / FACE_RESNET))
    return _MODELS


def faces_of(job: tuple[str, str]) -> dict:
    """One photo's face boxes (x0, y0, x1, y1) as the subject rule meets them and the boxes dlib's
    predictor gets: dlib HOG as the mask stage runs it (both the same), or RetinaFace (its box;
    the box its five points imply)."""
    import cv2

    path, detector = job
    cv2.setNumThreads(1)
    rgb = decode_rgb(Path(path).read_bytes())
    if detector == "retinaface":
        faces = retinaface.detect(rgb)
        boxes, predictor = [f.xyxy for f in faces], [dlib_box_from_points(f.points) for f in faces]
    else:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        hog = _models()["hog"]
        boxes = predictor = [box_from_rect(r) for r in (hog(gray, 0) or hog(gray, 1))]
    return {"w": rgb.shape[1], "h": rgb.shape[0], "boxes": boxes, "predictor": predictor}


def descriptors(job: tuple[str, list]) -> list[list[float]]:
    """dlib's face descriptor of the face in each (predictor) box of one photo."""
    import dlib

    path, boxes = job
    m = _models()
    rgb = decode_rgb(Path(path).read_bytes())
    return [list(m["net"].compute_face_descriptor(rgb, m["sp"](rgb, dlib.rectangle(*b)))) for b in boxes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default="data/sources/lfw")
    ap.add_argument("--detector", choices=("hog", "retinaface"), default="hog")
    ap.add_argument("--n-jobs", type=int, default=2)
    args = ap.parse_args()
    lfw = Path(args.lfw)
    people = sorted(read_people(lfw / "peopleDevTrain.txt"))
    photos = [str(p) for name in people for p in sorted((lfw / "lfw-deepfunneled" / name).glob("*.jpg"))]
    with Pool(args.n_jobs) as pool:
        found = dict(zip(photos, tqdm(pool.imap(faces_of, [(p, args.detector) for p in photos], chunksize=16),
                                      total=len(photos), desc=args.detector)))
        multi = [p for p in photos if len(found[p]["boxes"]) >= 2]
        # references: the single-face photos of the people who have a multi-face photo
        who = {Path(p).parent.name for p in multi}
        single = [p for p in photos if Path(p).parent.name in who and len(found[p]["boxes"]) == 1]
        jobs = [(p, found[p]["predictor"]) for p in multi + single]
        desc = dict(zip([p for p, _ in jobs], tqdm(pool.imap(descriptors, jobs, chunksize=4), total=len(jobs),
                                                    desc="descriptors")))
    reference: dict[str, np.ndarray] = {}
    for name in who:
        own = [desc[p][0] for p in single if Path(p).parent.name == name]
        if own:
            reference[name] = np.mean(own, axis=0)
    picks = {r: [] for r in RULES}
    truth_identity = []
    for p in multi:
        f = found[p]
        boxes, w, h = [tuple(b) for b in f["boxes"]], f["w"], f["h"]
        for r, rule in RULES.items():
            picks[r].append(rule(boxes, w, h))
        ref = reference.get(Path(p).parent.name)
        truth = None
        if ref is not None:
            d = np.linalg.norm(np.asarray(desc[p]) - ref, axis=1)
            if (d < SAME_PERSON).sum() == 1:
                truth = int(np.argmin(d))
        truth_identity.append(truth)
    n = len(multi)
    known = [i for i, t in enumerate(truth_identity) if t is not None]
    out = {"people": "View 1 train (peopleDevTrain.txt)", "detector": args.detector, "photos": len(photos),
           "no_face": sum(not found[p]["boxes"] for p in photos), "multi_face_photos": n,
           "identity_reference_photos": len(known),
           "disagree": {f"{a}_vs_{b}": sum(x != y for x, y in zip(picks[a], picks[b]))
                        for i, a in enumerate(RULES) for b in list(RULES)[i + 1:]},
           "identity_face_not_largest": sum(picks["largest"][i] != truth_identity[i] for i in known),
           "identity_face_area_share_of_largest_min": round(min(
               [area(found[multi[i]]["boxes"][truth_identity[i]]) / max(map(area, found[multi[i]]["boxes"]))
                for i in known], default=1.0), 3),
           "picks_identity_face": {r: sum(picks[r][i] == truth_identity[i] for i in known) for r in RULES},
           "differ_from_identity": {r: [Path(multi[i]).stem for i in known if picks[r][i] != truth_identity[i]]
                                    for r in RULES}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
