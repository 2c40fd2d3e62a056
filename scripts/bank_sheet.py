"""LFW faces wearing mask-bank entries next to the same faces in procedural masks: a contact sheet
to judge by eye whether the bank's masks look like real ones on other people.

Per row cell: the LFW photo, the photo wearing a bank entry (type "real", named above it), the photo
wearing the procedural mask the mask stage's defaults draw for it. The faces are every K-th View 1 TRAIN person
of LFW (their first photo), the entries as the mask stage draws them (seeded by image id).

Run after the mask_bank stage, from the project root:
  python scripts/bank_sheet.py [--bank data/mask_bank] [--every 97] [--n 24] [--out build/bank_worn.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import MaskParams  # noqa: E402
from pipeline.data.images import decode_rgb  # noqa: E402
from pipeline.mask.bank_stage import load_bank  # noqa: E402
from pipeline.mask.landmarks import check_predictor  # noqa: E402
from pipeline.mask.stage import get_detector, mask_image  # noqa: E402
from pipeline.data.protocols import read_people  # noqa: E402
from pipeline.stage_report import draw_sheet, fit_tile, write_png  # noqa: E402

TILE = 120


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bank", default="data/mask_bank")
    ap.add_argument("--lfw", default="data/sources/lfw/lfw-deepfunneled")
    ap.add_argument("--every", type=int, default=97)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--out", default="build/bank_worn.png")
    args = ap.parse_args()
    bank = load_bank(args.bank)
    if not bank:
        raise SystemExit(f"the mask bank at {args.bank} has no entries (its summary.json says why)")
    real, procedural = MaskParams(type_weights={"real": 1.0}), MaskParams()
    detector = get_detector(str(check_predictor(None)), procedural)
    cells = []
    train = read_people(Path(args.lfw).parent / "peopleDevTrain.txt")  # View 1 train people only
    people = sorted(p for p in Path(args.lfw).iterdir() if p.name in train)
    for person in tqdm(people[::args.every][:args.n], desc="faces", unit="face"):
        photo = sorted(person.iterdir())[0]
        rgb = decode_rgb(photo.read_bytes())
        image_id = f"{person.name}/{photo.stem}"
        a, b = (mask_image(rgb, image_id, detector, p, bank) for p in (real, procedural))
        if "masked" in a and "masked" in b:
            cells.append((f"{a['texture'][-20:]} | {b['mask_type']}",
                          [fit_tile(rgb, TILE), fit_tile(a["masked"], TILE), fit_tile(b["masked"], TILE)]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_png(Path(args.out), draw_sheet([cells[i:i + 3] for i in range(0, len(cells), 3)], TILE, font_scale=0.33))
    print(f"{len(cells)} faces -> {args.out}")


if __name__ == "__main__":
    main()
