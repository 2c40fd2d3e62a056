"""How far the project's synthetic masked faces are from real masked photos (issue 23, item 3).

A classifier learns to tell real masked faces from synthetic ones, looking at the mask region only
in a common frontal frame (pipeline/mask/realism.py); its out-of-fold accuracy is the measure: 50% =
indistinguishable, 100% = always told apart. Per condition, the same real photos against the same
LFW faces wearing:

- procedural: the mask stage's defaults (five procedural types);
- bank: entries of the mask bank (type "real" only);
- mix: procedural and bank masks half and half (type_weights.real = the procedural weights' sum).

The LFW faces are View 1 TRAIN people's (the first photo of an evenly spaced pick): nothing here
looks at a test person. Reals are the mask bank's kept RMFD photos (their cut is the region), split by a seeded hash:
two thirds are the reals scored here, the other third the only bank entries the synthetic faces
may wear, so no real photo's own mask is ever worn by a synthetic face it is compared with. The
control scores the same photos' eye band (no mask in it): how well the classifier tells RMFD's
photos from LFW's without looking at any mask, the collection gap under which no mask figure can
go. Intervals: bootstrap over samples; mix - procedural paired on the same samples.

Run after the mask_bank stage, from the project root (a few minutes on 2 cores):
  python scripts/realism.py [--bank data/mask_bank] [--out eval/realism.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import MaskParams  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.mask.bank import BankBuilder  # noqa: E402
from pipeline.mask.bank_stage import load_bank  # noqa: E402
from pipeline.mask.landmarks import check_predictor  # noqa: E402
from pipeline.mask.realism import eye_crop, mask_crop, paired_difference, separability  # noqa: E402
from pipeline.mask.stage import get_detector, mask_image  # noqa: E402
from pipeline.data.protocols import read_people  # noqa: E402
from pipeline.seeding import rank_key  # noqa: E402
from pipeline.stage_report import draw_sheet, fit_tile, write_png  # noqa: E402

CONDITIONS = ("procedural", "bank", "mix")


def _real_samples(bank_dir: Path, photos: Path, scored_share: float):
    kept = sorted((r["source"] for r in pq.read_table(bank_dir / "status.parquet").to_pylist()
                   if r["status"] == "kept"), key=lambda s: rank_key(0, s))
    n_scored = int(round(scored_share * len(kept)))
    scored, wearable = kept[:n_scored], set(kept[n_scored:])
    builder = BankBuilder(str(check_predictor(None)))
    crops, eyes = [], []
    for source in tqdm(sorted(scored), desc="real photos", unit="photo"):
        rgb = decode_rgb((photos / source).read_bytes())
        e = builder.entry(rgb, source=source, index=0)
        if e.kept:  # the same cut the stage kept (deterministic)
            crops.append(mask_crop(rgb, e.landmarks, e.cut))
            eyes.append(eye_crop(rgb, e.landmarks))
    return np.array(crops), np.array(eyes), wearable


def _synthetic_samples(lfw: Path, n: int, bank: list):
    default = MaskParams()
    params = {"procedural": default, "bank": MaskParams(type_weights={"real": 1.0}),
              "mix": MaskParams(type_weights={**default.type_weights, "real": sum(default.type_weights.values())})}
    detector = get_detector(str(check_predictor(None)), default)
    crops = {c: [] for c in CONDITIONS}
    eyes = []
    train = read_people(lfw.parent / "peopleDevTrain.txt")  # View 1 train people: never a test person
    people = sorted(p for p in lfw.iterdir() if p.is_dir() and p.name in train)
    for person in tqdm(people[::max(1, len(people) // (2 * n))], desc="LFW faces", unit="face"):
        photo = sorted(person.iterdir())[0]
        rgb = decode_rgb(photo.read_bytes())
        image_id = f"{person.name}/{photo.stem}"
        masked = {c: mask_image(rgb, image_id, detector, p, bank) for c, p in params.items()}
        if not all("masked" in m for m in masked.values()):
            continue
        for c, m in masked.items():
            crops[c].append(mask_crop(m["masked"], m["landmarks"], m["mask"]))
        eyes.append(eye_crop(rgb, masked["procedural"]["landmarks"]))
        if len(eyes) == n:
            break
    return {c: np.array(v) for c, v in crops.items()}, np.array(eyes)


def _sheet(real: np.ndarray, synthetic: dict, path: Path, k: int = 6) -> None:
    """What the classifier sees: k real crops, then k of each condition."""
    side = max(real.shape[1:3])
    tile = lambda x: fit_tile((np.clip(x[..., :3], 0, 1) * 255).astype(np.uint8), side)  # noqa: E731
    rows = [[("real (RMFD)", [tile(x) for x in real[:k]])]]
    rows += [[(c, [tile(x) for x in synthetic[c][:k]])] for c in CONDITIONS]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, draw_sheet(rows, side, font_scale=0.4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bank", default="data/mask_bank")
    ap.add_argument("--photos", default="data/sources/rmfd", help="the mask bank's photo folder (mask_bank.path)")
    ap.add_argument("--lfw", default="data/sources/lfw/lfw-deepfunneled")
    ap.add_argument("--scored-share", type=float, default=2 / 3, help="of the kept photos, the share scored as reals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval/realism.md")
    ap.add_argument("--sheet", default="build/realism_crops.png")
    args = ap.parse_args()
    real, real_eyes, wearable = _real_samples(Path(args.bank), Path(args.photos), args.scored_share)
    bank = [t for t in load_bank(args.bank) if t.texture in wearable]
    if not len(real) or not bank:
        raise SystemExit(f"the mask bank at {args.bank} has too few kept photos for this measure")
    synthetic, fake_eyes = _synthetic_samples(Path(args.lfw), len(real), bank)
    _sheet(real, synthetic, Path(args.sheet))
    results = {c: separability(real, synthetic[c], seed=args.seed) for c in tqdm(CONDITIONS, desc="classifiers")}
    control = separability(real_eyes, fake_eyes, seed=args.seed)
    out = {"real_photos": len(real), "bank_entries_worn": len(bank), "lfw_faces": len(fake_eyes),
           **{c: r.as_dict() for c, r in results.items()}, "control_eye_band": control.as_dict(),
           "mix_minus_procedural": paired_difference(results["mix"], results["procedural"], seed=args.seed),
           "bank_minus_procedural": paired_difference(results["bank"], results["procedural"], seed=args.seed)}
    print(json.dumps(out))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Real masked photos (RMFD, mask bank's kept photos not worn here): {len(real)}; LFW faces: "
             f"{len(fake_eyes)}; bank entries the faces may wear: {len(bank)}. Accuracy of a classifier telling real "
             "from synthetic on held-out samples (5-fold), mask region only; 50% = indistinguishable. "
             f"`python scripts/realism.py` (seed {args.seed}).", "",
             "| synthetic masks | accuracy [95% CI] | AUC |", "|---|---|---|"]
    for c in CONDITIONS:
        r = results[c]
        lines.append(f"| {c} | {pct(r.accuracy)} [{pct(r.accuracy_ci[0])}, {pct(r.accuracy_ci[1])}] | {r.auc:.3f} |")
    lines.append(f"| control: eye band, no mask | {pct(control.accuracy)} [{pct(control.accuracy_ci[0])}, "
                 f"{pct(control.accuracy_ci[1])}] | {control.auc:.3f} |")
    for key, name in (("mix_minus_procedural", "mix - procedural"), ("bank_minus_procedural", "bank - procedural")):
        d = out[key]
        lines.append(f"\n{name}: {100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] points")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
