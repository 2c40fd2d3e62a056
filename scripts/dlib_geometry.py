"""Does our crop geometry cost dlib's network accuracy? The same View 1 DevTest pairs, the same
network (the torch port), two inputs:

- ``own_chip``: dlib's own alignment: HOG face + 68 landmarks on the original photo, then
  ``get_face_chip(size=150, padding=0.25)`` (what the network was trained on);
- ``our_crop``: our aligned 112 crop (data/lfw/aligned, raw twin) resampled to the chip layout,
  as the reference row and fine-tuning see it.

Photos where HOG finds no face (upsample 0, then 1) fall back to our crop for ``own_chip``
(counted). Prints one JSON line: 10-fold accuracy, AUC, EER and TAR at fixed FARs for both.

    python scripts/dlib_geometry.py [--aligned data/lfw/aligned] [--lfw data/sources/lfw]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dlib
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dlib_models import SHAPE_68, dlib_models_dir  # noqa: E402
from pipeline.dlib_resnet import DlibEmbeddingNet  # noqa: E402
from pipeline.evaluation import aligned_eval_chunks, read_aligned_chunk  # noqa: E402
from pipeline.images import decode_rgb  # noqa: E402
from pipeline.metrics import l2_normalize, verification_metrics  # noqa: E402
from pipeline.protocols import parse_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aligned", default="data/lfw/aligned")
    ap.add_argument("--lfw", default="data/sources/lfw")
    args = ap.parse_args()
    lfw = Path(args.lfw)
    pairs = parse_pairs(lfw / "pairsDevTest.txt")
    wanted = set(pairs.a) | set(pairs.b)
    crops = {}
    for chunk in aligned_eval_chunks(args.aligned):
        ids, _, raw, _ = read_aligned_chunk(chunk)
        crops.update({i: raw[k] for k, i in enumerate(ids) if i in wanted})
    ids = sorted(wanted & set(crops))
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_68))
    net = DlibEmbeddingNet().load_dat().eval()
    own, fallback = [], 0
    for i in tqdm(ids, desc="dlib chips", unit="img"):
        img = decode_rgb((lfw / "lfw-deepfunneled" / f"{i}.jpg").read_bytes())
        faces = det(img, 0) or det(img, 1)
        if faces:  # the face nearest the centre, as LFW's subject is
            c = np.array(img.shape[1::-1]) / 2
            face = min(faces, key=lambda r: np.hypot(r.center().x - c[0], r.center().y - c[1]))
            own.append(dlib.get_face_chip(img, sp(img, face), size=150, padding=0.25))
        else:
            own.append(None)
            fallback += 1

    def embed(batch: list[np.ndarray], chips: bool) -> np.ndarray:
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            return (net.net(x) if chips else net(x / 127.5 - 1)).numpy()

    ours = np.concatenate([embed([crops[i] for i in ids[k:k + 128]], False) for k in range(0, len(ids), 128)])
    native = ours.copy()
    have = [k for k, c in enumerate(own) if c is not None]
    for k in range(0, len(have), 128):
        idx = have[k:k + 128]
        native[idx] = embed([own[j] for j in idx], True)
    out = {"pairs": len(pairs), "images": len(ids), "own_chip_fallbacks": fallback}
    pos = {i: k for k, i in enumerate(ids)}
    keep = np.array([a in pos and b in pos for a, b in zip(pairs.a, pairs.b)])
    kept = pairs.subset(keep)
    ia, ib = [pos[a] for a in kept.a], [pos[b] for b in kept.b]
    for name, e in (("own_chip", native), ("our_crop", ours)):
        e = l2_normalize(e)
        m = verification_metrics(np.sum(e[ia] * e[ib], axis=1), kept.same, kept.fold)
        out[name] = {k: round(float(v), 4) for k, v in m.items() if not k.startswith("pairs_")}
    out["pairs_scored"] = len(kept)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
