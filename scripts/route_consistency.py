"""Route consistency: does a probe aligned on its own (as `embed` / `identify` do) look to the model
like the pair-aligned probes it was evaluated (and trained) on?

On the LFW View 1 DevTest pairs, the first image stays as evaluated (pair-aligned raw crop); the
second image, unmasked or wearing its synthetic mask, is aligned standalone by one detector route
at a time, embedded, and the pairs are scored (10-fold accuracy, as `evaluate`). The `pair` row is
the evaluation's own crops (the twin's transform from dlib's landmarks on the unmasked photo).
Each route is scored on the pairs whose probe it aligned, next to the pair-aligned probe on the
same pairs, so the difference is the route's geometry alone. Also per route: the probes found, and
how far the route's crop puts dlib's eye centres from where the pair transform puts them
(ArcFace-112 px).

`--people validation` does the same on the validation people's pairs (the held-out train people
of data/shards/val-*.tar and the pairs the validate stage scores): where a choice between training
options may look (`--routes retinaface` for the standalone default alone). Each route's accuracy
against the pair-aligned probe's on the same pairs is also given as a paired difference with a
95% interval, bootstrap over the identities of the pairs' first images.

Run after `make repro` from the project root; prints one JSON line and writes a markdown table:
  python scripts/route_consistency.py [--model models/model.pt] [--people test|validation]
      [--routes retinaface,haar] [--out eval/route_consistency.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import detection as al  # noqa: E402
from pipeline.align import geometry as geo  # noqa: E402
from pipeline.bootstrap import draw_identities, interval, replicate  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.recognition.embedders import make_embedder  # noqa: E402
from pipeline.evaluate.evaluation import VIEW1_PAIRS, aligned_template, read_aligned_chunk  # noqa: E402
from pipeline.data.images import apply_overlay, decode_rgb  # noqa: E402
from pipeline.metrics import kfold_correct, verification_metrics  # noqa: E402
from pipeline.data.protocols import build_validation_pairs, parse_pairs  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402

# (row name, standalone route, retinaface_points)
VARIANTS = (("retinaface five points", "retinaface", "five"),
            ("retinaface eyes", "retinaface", "eyes"),
            ("retinaface box + dlib 68 -> five", "retinaface", "dlib68"),
            ("haar eyes", "haar", "five"),
            ("dlib HOG + 68 -> five", "dlib_hog", "five"))


def load_probes(data: Path, wanted: set[str], split: str = "test") -> dict[str, dict]:
    """{image id: raw photo, masked photo, dlib's 68 points} for the wanted images of ``split``."""
    out = {}
    for chunk in list_chunks(data / "ingest" / "chunks", prefix=f"{split}-"):
        twins = dict(read_chunk(data / "masked" / "chunks" / chunk.name))
        for key, m in read_chunk(chunk):
            if key not in wanted or key not in twins:
                continue
            meta = json.loads(twins[key]["json"])
            raw = decode_rgb(m.get("jpg", m.get("png")))
            if "overlay.png" not in twins[key] or len(meta.get("landmarks") or []) != 68:
                continue
            out[key] = {"raw": raw, "masked": apply_overlay(raw, meta["overlay_box"], decode_rgb(twins[key]["overlay.png"])),
                        "landmarks": np.asarray(meta["landmarks"], float)}
    return out


def _diff(cond: dict) -> str:
    d = cond["route_minus_pair_aligned"]
    ci = "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return f"{100 * d['diff']:+.1f}{ci}"


def _tar(m: dict) -> str:
    return "n/a" if m["tar_at_far_1e-2"] is None else f"{m['tar_at_far_1e-2']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--dataset", default="lfw")
    ap.add_argument("--out", default="eval/route_consistency.md")
    ap.add_argument("--every", type=int, default=1, help="score every k-th pair only (a quick look)")
    ap.add_argument("--people", choices=("test", "validation"), default="test")
    ap.add_argument("--routes", default="", help="comma-separated standalone routes to score (default: all rows)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    params = load_params()
    data = Path("data") / args.dataset
    template = geo.get_template(aligned_template(data / "aligned"))
    embedder = make_embedder(args.model, template=template.name)
    crops: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the evaluated (pair-aligned) crops
    if args.people == "test":
        pairs = parse_pairs(data / "ingest" / "protocol" / VIEW1_PAIRS)
        wanted = set(pairs.a) | set(pairs.b)
        for chunk in list_chunks(data / "aligned" / "chunks", prefix="test-"):
            ids, _, raw, masked = read_aligned_chunk(chunk)
            crops.update({i: (r, m) for i, r, m in zip(ids, raw, masked) if i in wanted})
    else:  # the validate stage's people and pairs
        identity = {}
        for chunk in read_shard_set("data/shards").val:
            for key, m in read_chunk(chunk):
                identity[key] = json.loads(m["json"])["identity"]
                crops[key] = (decode_rgb(m["raw.jpg"]), decode_rgb(m["masked.jpg"]))
        ids = sorted(identity)
        pairs = build_validation_pairs(ids, [identity[i] for i in ids], per_identity=params.validation.pairs_per_identity,
                                       n_folds=params.evaluate.n_folds, seed=params.evaluate.seed)
    keep = np.array([a in crops and b in crops and k % args.every == 0
                     for k, (a, b) in enumerate(zip(pairs.a, pairs.b))])
    pairs = pairs.subset(keep)
    probes = load_probes(data, set(pairs.b), "test" if args.people == "test" else "train")
    firsts = sorted(set(pairs.a))
    first_emb = dict(zip(firsts, embedder.embed(np.stack([crops[i][0] for i in firsts]), progress="first side")))

    # each route on each probe, unmasked and masked
    second = sorted(set(pairs.b))
    rows: dict[str, dict] = {"pair": {}}
    for kind in ("raw", "masked"):
        rows["pair"][kind] = dict(zip(second, embedder.embed(
            np.stack([crops[i][0 if kind == "raw" else 1] for i in second]), progress=f"pair {kind}")))
    geometry = {}
    chosen = set(filter(None, args.routes.split(",")))
    for name, route, points in [v for v in VARIANTS if not chosen or v[1] in chosen and v[2] == "five"]:
        sp = params.standalone.model_copy(update={"routes": [route], "retinaface_points": points})
        rows[name], geometry[name] = {}, {}
        for kind in ("raw", "masked"):
            got, errs = {}, []
            for i in tqdm(second, desc=f"{name} {kind}"):
                res = al.align_standalone(probes[i][kind], params=sp, template=template) if i in probes else None
                if res is None or res.crop is None:
                    continue
                got[i] = res.crop
                dlib5 = geo.five_points_from_landmarks(probes[i]["landmarks"])
                pair_m = geo.umeyama_similarity(dlib5, template.points)
                eyes = np.stack(geo.eye_centres_from_landmarks(probes[i]["landmarks"]))
                errs.append(np.linalg.norm(geo.apply_matrix(res.matrix, eyes) - geo.apply_matrix(pair_m, eyes),
                                           axis=1).max() / template.px_per_arcface_px)
            ids = sorted(got)
            rows[name][kind] = dict(zip(ids, embedder.embed(np.stack([got[i] for i in ids])))) if ids else {}
            geometry[name][kind] = {"found": len(ids), "probes": len(second),
                                    "eye_shift_median_px": round(float(np.median(errs)), 2) if errs else None,
                                    "eye_shift_within_4px": round(float(np.mean(np.asarray(errs) <= 4)), 4) if errs else None}

    def pair_scores(r: dict, on, kind: str) -> np.ndarray:
        return np.array([float(first_emb[a] @ r[kind][b]) for a, b in zip(on.a, on.b)])

    def scores(r: dict, on, kind: str) -> dict:
        m = verification_metrics(pair_scores(r, on, kind), on.same, on.fold)
        tar = m["tar_at_far_1e-2"]  # None where the impostor pairs cannot reach FAR 1e-2
        return {"accuracy": round(m["accuracy"], 4), "tar_at_far_1e-2": None if tar is None else round(tar, 4)}

    def paired(r: dict, on, kind: str) -> dict:
        """route - pair-aligned accuracy on the same pairs, bootstrap over first-image identities."""
        right = {n: kfold_correct(pair_scores(x, on, kind), on.same, on.fold) for n, x in (("r", r), ("p", rows["pair"]))}
        draws = draw_identities([a.split("/")[0] for a in on.a], replicates=1000, seed=0, tag="route_consistency")
        reps = replicate(lambda i: {"d": float(right["r"][i].mean() - right["p"][i].mean())}, draws)["d"]
        ci = interval(reps, 0.95)
        return {"diff": round(float(right["r"].mean() - right["p"].mean()), 4),
                "low": None if ci is None else round(ci["low"], 4), "high": None if ci is None else round(ci["high"], 4)}

    # each route on every pair whose probe it aligned, the pair-aligned probe on the same pairs
    report = {"pairs": len(pairs), "template": template.name, "model": args.model, "routes": {}}
    for name, r in rows.items():
        report["routes"][name] = dict(geometry.get(name, {}))
        for kind, cond in (("raw", "unmasked_unmasked"), ("masked", "masked_unmasked")):
            own = pairs.subset(np.array([b in r[kind] for b in pairs.b]))
            report["routes"][name][cond] = {"pairs": len(own), "route": scores(r, own, kind),
                                            "pair_aligned": scores(rows["pair"], own, kind)}
            if name != "pair":
                report["routes"][name][cond]["route_minus_pair_aligned"] = paired(r, own, kind)
    where = "LFW View 1 DevTest" if args.people == "test" else "the validation people's pairs"
    lines = [f"Route consistency on {where} ({len(pairs)} pairs; {len(second)} distinct second "
             f"images), model `{args.model}`, template {template.name}: the second image of each pair "
             f"aligned standalone by one route, the first as evaluated; each route scored on the pairs "
             f"whose probe it aligned, against the pair-aligned probe on the same pairs.\n",
             "| probe alignment | probes found (unmasked / masked) | u-u accuracy: route / pair-aligned | "
             "m-u accuracy: route / pair-aligned | m-u route - pair-aligned [95% CI] | "
             "m-u TAR@FAR 1%: route / pair-aligned | eye shift vs pair transform, median px (unmasked / masked) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["routes"].items():
        if name == "pair":
            continue
        uu, mu = r["unmasked_unmasked"], r["masked_unmasked"]
        lines.append(f"| {name} | {r['raw']['found']} / {r['masked']['found']} of {len(second)} | "
                     f"{100 * uu['route']['accuracy']:.1f} / {100 * uu['pair_aligned']['accuracy']:.1f} "
                     f"({uu['pairs']} pairs) | {100 * mu['route']['accuracy']:.1f} / "
                     f"{100 * mu['pair_aligned']['accuracy']:.1f} ({mu['pairs']} pairs) | {_diff(mu)} | "
                     f"{_tar(mu['route'])} / {_tar(mu['pair_aligned'])} | "
                     f"{r['raw']['eye_shift_median_px']} / {r['masked']['eye_shift_median_px']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
