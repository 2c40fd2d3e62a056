"""What does the crop geometry cost dlib's network? The same pairs, the same network (the torch
port), five inputs made from the original photos. The pairs are the validation people's
(``--pairs validation``, the default: pack's held-out train people, the validate stage's pairs),
where the align defaults are chosen; ``--pairs devtest`` scores View 1 DevTest (test: not for
choosing). The inputs:

- ``own_chip``: dlib's own alignment: HOG face + 68 landmarks, ``get_face_chip(size=150,
  padding=0.25)`` (what the network was trained on);
- ``{cascade,landmarks}_{arcface112,dlib150}``: our align routes (``align.method``: Haar face + eyes,
  or the 5-point similarity from the same 68 landmarks) onto each crop template
  (``align.template``); ``arcface112`` crops are resampled to the chip inside the network, as the
  reference row and fine-tuning see them.

Photos where HOG finds no face (upsample 0, then 1) or no Haar face is found use the cascade /
landmark fallback of the align stage; their count is printed. One JSON line: 10-fold accuracy (with
its 95% interval, bootstrap over identities), AUC, EER and TAR at fixed FARs per input, and each
input's paired difference in accuracy to the default (landmarks_dlib150).

    python scripts/dlib_geometry.py [--lfw data/sources/lfw] [--shards data/shards] [--pairs validation]
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

from pipeline.align import geometry as geo  # noqa: E402
from pipeline.align.detection import estimate_pair_transform  # noqa: E402
from pipeline.dlib_models import SHAPE_68, dlib_models_dir  # noqa: E402
from pipeline.recognition.dlib_resnet import DlibEmbeddingNet  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.bootstrap import draw_identities, interval, paired_difference, replicate  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate.evaluation import round_metrics  # noqa: E402
from pipeline.metrics import kfold_accuracy, l2_normalize, verification_metrics  # noqa: E402
from pipeline.recognition.models import pixels_to_input  # noqa: E402
from pipeline.data.protocols import build_validation_pairs, parse_pairs  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402
from pipeline.data.tar_chunks import read_chunk  # noqa: E402

SHOWN = ("accuracy", "auc", "eer", "tar_at_far_1e-2", "tar_at_far_1e-3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default="data/sources/lfw")
    ap.add_argument("--shards", default="data/shards", help="pack's output: the validation people's images")
    ap.add_argument("--pairs", choices=("validation", "devtest"), default="validation")
    ap.add_argument("--params", default="params.yaml", help="evaluate and validation sections")
    args = ap.parse_args()
    lfw = Path(args.lfw)
    params = load_params(args.params)
    if args.pairs == "devtest":
        pairs = parse_pairs(lfw / "pairsDevTest.txt")
    else:
        members = [json.loads(m["json"]) for c in read_shard_set(args.shards).val for _, m in read_chunk(c)]
        pairs = build_validation_pairs([m["image_id"] for m in members], [m["identity"] for m in members],
                                       per_identity=params.validation.pairs_per_identity,
                                       n_folds=params.evaluate.n_folds, seed=params.evaluate.seed)
    ids = sorted(set(pairs.a) | set(pairs.b))
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_68))
    inputs: dict[str, list[np.ndarray]] = {"own_chip": []}
    routes: dict[str, dict[str, int]] = {}
    no_hog = 0
    for i in tqdm(ids, desc="photos", unit="img"):
        img = decode_rgb((lfw / "lfw-deepfunneled" / f"{i}.jpg").read_bytes())
        faces = det(img, 0) or det(img, 1)
        shape = landmarks = None
        if faces:  # the subject, as the mask stage picks it
            subject = geo.subject_index([geo.box_from_rect(r) for r in faces], img.shape[1], img.shape[0])
            shape = sp(img, faces[subject])
            landmarks = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        else:
            no_hog += 1
        for method in ("cascade", "landmarks"):
            for t in (geo.ARCFACE_112, geo.DLIB_150):
                est = estimate_pair_transform(img, landmarks, method=method, template=t)
                name = f"{method}_{t.name}"
                routes.setdefault(name, {}).setdefault(est.route, 0)
                routes[name][est.route] += 1
                crop = geo.warp(img, est.matrix, t.size) if est.matrix is not None else None
                inputs.setdefault(name, []).append(crop)
        inputs["own_chip"].append(dlib.get_face_chip(img, shape, size=150, padding=0.25) if shape else None)

    net = DlibEmbeddingNet().load_dat().eval()

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        x = pixels_to_input(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
        with torch.inference_mode():
            return net(x).numpy()

    out = {"pairs_from": args.pairs, "pairs": len(pairs), "images": len(ids), "no_hog_face": no_hog, "routes": routes}
    ev = params.evaluate
    draws = draw_identities([a.split("/", 1)[0] for a in pairs.a], replicates=ev.bootstrap_replicates,
                            seed=ev.seed, tag="dlib_geometry")
    reps = {}
    for name, crops in inputs.items():
        have = [k for k, c in enumerate(crops) if c is not None]
        e = l2_normalize(np.concatenate([embed([crops[j] for j in have[k:k + 128]])
                                         for k in range(0, len(have), 128)]))
        pos = {ids[j]: k for k, j in enumerate(have)}
        keep = np.array([a in pos and b in pos for a, b in zip(pairs.a, pairs.b)])
        kept = pairs.subset(keep)
        m = verification_metrics(np.sum(e[[pos[a] for a in kept.a]] * e[[pos[b] for b in kept.b]], axis=1),
                                 kept.same, kept.fold)
        out[name] = {"pairs_scored": int(keep.sum()),
                     **{k: round(float(v), 4) for k, v in m.items() if k in SHOWN and v is not None}}
        if keep.all():  # every pair scored: replicates on the common draws, paired across inputs
            s = np.sum(e[[pos[a] for a in pairs.a]] * e[[pos[b] for b in pairs.b]], axis=1)
            reps[name] = replicate(lambda i: {"accuracy": kfold_accuracy(s[i], pairs.same[i], pairs.fold[i]).accuracy},
                                   draws)["accuracy"]
            out[name]["accuracy_ci"] = round_metrics(interval(reps[name], ev.ci_level), 4)
    base = "landmarks_dlib150"
    for name in reps:
        if name != base and base in reps:
            out[name]["accuracy_vs_default"] = round_metrics(paired_difference(
                out[name]["accuracy"], out[base]["accuracy"], reps[name], reps[base], ev.ci_level), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
