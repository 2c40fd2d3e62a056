"""What identify's default threshold admits on REAL masked photos of strangers.

A gallery of N LFW View 1 test people, each enrolled from one unmasked photo (``_0001``) as
`identify` enrols; their second photo (``_0002``) wearing the project's synthetic mask (the mask
stage's overlay) searches as the mated probe; every photo of ../shared/data/rmfd (real masks,
people who are not in LFW) searches as a stranger, except the photos whose mask is in the mask bank
(data/mask_bank: a model trained with `mask.type_weights.real` > 0 has seen those masks on LFW
faces; the same photos are left out for every embedder, so the strangers are the ones the bank
rejected: smaller faces, crowds, masks the cutter could not follow). Each search is aligned on its own (the
RetinaFace route, as identify does) and decided at identify's threshold for ``--fpir`` at this
gallery size (validation/thresholds.json: set on the validation people with synthetic masks).
Reported per embedder: strangers admitted, mated probes named right / wrongly / "unknown", with
95% Wilson intervals (RMFD has no identities: its photos are counted as independent, which they
are not quite; one mated probe per person). Photos that cannot be aligned are counted apart.

Run after `make repro`, from the project root (about 5 minutes on 2 cores):
  python scripts/identify_strangers.py [--people 100] [--fpir 1e-2] [--out eval/identify_strangers.md]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.embed import embed_paths, embedder_info  # noqa: E402
from pipeline.recognition.embedders import make_embedder  # noqa: E402
from pipeline.data.images import apply_overlay, decode_rgb  # noqa: E402
from pipeline.mask.bank_stage import photos_in_bank  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402
from pipeline.metrics import enrol  # noqa: E402
from pipeline.evaluate.thresholds import find_entry, threshold_for  # noqa: E402

LFW = Path("data/sources/lfw/lfw-deepfunneled")
RMFD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rmfd"


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def masked_photos(people: list[str], out: Path) -> list[str]:
    """``<person>/<person>_0002.jpg`` with its synthetic mask, rebuilt from the mask stage's overlay."""
    wanted = {f"{p}/{p}_0002" for p in people}
    written = []
    for chunk in list_chunks(Path("data/lfw/masked/chunks")):
        for _, m in read_chunk(chunk):
            info = json.loads(m["json"])
            if info["image_id"] not in wanted:
                continue
            raw = decode_rgb((LFW / f"{info['image_id']}.jpg").read_bytes())
            masked = apply_overlay(raw, info["overlay_box"], decode_rgb(m["overlay.png"]))
            rel = f"{info['image_id']}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / rel), cv2.cvtColor(masked, cv2.COLOR_RGB2BGR))
            written.append(rel)
    return sorted(written)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--people", type=int, default=100, help="gallery size")
    ap.add_argument("--fpir", default="1e-2")
    ap.add_argument("--thresholds", default="validation/thresholds.json")
    ap.add_argument("--rmfd", default=str(RMFD))
    ap.add_argument("--bank", default="data/mask_bank", help="the mask bank stage's output: its photos are left out")
    ap.add_argument("--out", default="eval/identify_strangers.md")
    args = ap.parse_args()
    standalone = load_params("params.yaml").standalone
    test_people = [ln.split()[0] for ln in (Path("data/sources/lfw") / "peopleDevTest.txt").read_text().splitlines()[1:]
                   if ln.strip() and int(ln.split()[1]) >= 2]
    people = sorted(test_people)[:: max(1, len(test_people) // args.people)][:args.people]
    in_bank = photos_in_bank(args.bank)
    every = sorted(str(p.relative_to(args.rmfd)) for p in Path(args.rmfd).rglob("*.jpg"))
    strangers = [s for s in every if s not in in_bank]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        probes = masked_photos(people, Path(tmp))
        for name in ("model", "dlib"):
            model = args.model if name == "model" else "dlib"
            embedder = make_embedder(model, device="cpu")
            t, size, extrapolated = threshold_for(find_entry(args.thresholds, embedder_info(embedder, model, False)),
                                                  args.fpir, len(people))
            gal = embed_paths(LFW, [f"{p}/{p}_0001.jpg" for p in people], embedder=embedder,
                              standalone=standalone).to_pylist()
            ok = [r for r in gal if r["embedding"] is not None]
            names, templates = enrol([r["identity"] for r in ok], np.array([r["embedding"] for r in ok], np.float32))

            def search(root, rels):
                res = embed_paths(Path(root), rels, embedder=embedder, standalone=standalone).to_pylist()
                found = [r for r in res if r["embedding"] is not None]
                if not found:
                    return res, found, np.zeros(0, int), np.zeros(0)
                s = np.array([r["embedding"] for r in found], np.float32) @ templates.T
                return res, found, s.argmax(axis=1), s.max(axis=1)

            mres, mfound, mbest, mtop = search(tmp, probes)
            sres, sfound, _, stop = search(args.rmfd, strangers)
            right = sum(names[b] == r["identity"] and s > t for r, b, s in zip(mfound, mbest, mtop))
            wrong = sum(names[b] != r["identity"] and s > t for r, b, s in zip(mfound, mbest, mtop))
            admitted = int((stop > t).sum())
            rows[name] = {"threshold": round(t, 4), "set_for_gallery_size": size, "extrapolated": extrapolated,
                          "enrolled": len(names), "mated_searches": len(mfound), "mated_not_aligned": len(mres) - len(mfound),
                          "named_right": int(right), "named_right_ci": wilson(int(right), len(mfound)),
                          "named_wrong": int(wrong), "unknown": len(mfound) - int(right) - int(wrong),
                          "strangers": len(sfound), "strangers_not_aligned": len(sres) - len(sfound),
                          "strangers_admitted": admitted, "strangers_admitted_share": round(admitted / max(1, len(sfound)), 4),
                          "strangers_admitted_ci": wilson(admitted, len(sfound))}
    print(json.dumps({"people": len(people), "fpir": args.fpir, "rmfd_photos": len(every),
                      "left_out_in_bank": len(every) - len(strangers), **rows}))
    lines = [f"Gallery of {len(people)} LFW test people (one unmasked photo each), FPIR target {args.fpir} "
             f"(validation/thresholds.json); mated: their 2nd photo with a synthetic mask; strangers: RMFD photos "
             f"(real masks), {len(every) - len(strangers)} of {len(every)} left out as in the mask bank. `python scripts/identify_strangers.py --people {args.people} --fpir {args.fpir}`", "",
             "| embedder | threshold | strangers admitted [95% CI] | mated named right [95% CI] | wrong person | unknown |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ci = r["strangers_admitted_ci"] or [0, 0]
        cr = r["named_right_ci"] or [0, 0]
        lines.append(f"| {name} | {r['threshold']:.3f} | {r['strangers_admitted']} / {r['strangers']} "
                     f"({100 * r['strangers_admitted_share']:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]) | "
                     f"{r['named_right']} / {r['mated_searches']} [{100 * cr[0]:.1f}, {100 * cr[1]:.1f}]% | "
                     f"{r['named_wrong']} | {r['unknown']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
