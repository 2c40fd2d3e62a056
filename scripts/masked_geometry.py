"""How standalone alignment moves a masked face against the geometry training uses (issue 23,
item 2): the distribution that `train.augment.masked_geometry: standalone` draws from.

On TRAIN people's photos (every k-th; never a test person), each masked twin is aligned on its own
by the standalone default (RetinaFace's five points, as `embed` / `identify` align) and by the pair
transform (dlib's five points on the unmasked photo, as the align stage does). The difference of the
two, a similarity in crop coordinates (standalone crop <- pair crop), is split into a shift of the
crop's centre (share of the crop side), a rotation (degrees) and a log scale; their spread is what
pipeline/train/pair_loader.py's MASKED_GEOMETRY holds. The unmasked photos are measured beside them.

Run after `make repro`, from the project root (about a minute on 2 cores):
  python scripts/masked_geometry.py [--every 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import detection as al  # noqa: E402
from pipeline.align import geometry as geo  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate.evaluation import aligned_template  # noqa: E402
from pipeline.data.images import apply_overlay, decode_rgb  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402


def delta(standalone: np.ndarray, pair: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """(dx, dy in crop sides, rotation in degrees, log scale) of standalone o pair^-1."""
    a = np.vstack([standalone, [0, 0, 1]]) @ np.linalg.inv(np.vstack([pair, [0, 0, 1]]))
    c = np.array([(size - 1) / 2.0, (size - 1) / 2.0, 1.0])
    moved = a[:2] @ c - c[:2]
    return (float(moved[0] / size), float(moved[1] / size), float(np.degrees(np.arctan2(a[1, 0], a[0, 0]))),
            float(0.5 * np.log(abs(np.linalg.det(a[:2, :2])))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="lfw")
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args()
    params = load_params()
    data = Path("data") / args.dataset
    template = geo.get_template(aligned_template(data / "aligned"))
    found: dict[str, list] = {"raw": [], "masked": []}
    missed = {"raw": 0, "masked": 0}
    chunks = list_chunks(data / "ingest" / "chunks", prefix="train-")
    n = 0
    for chunk in tqdm(chunks, desc="chunks"):
        twins = dict(read_chunk(data / "masked" / "chunks" / chunk.name))
        for key, m in read_chunk(chunk):
            n += 1
            if n % args.every or key not in twins or "overlay.png" not in twins[key]:
                continue
            meta = json.loads(twins[key]["json"])
            raw = decode_rgb(m.get("jpg", m.get("png")))
            photos = {"raw": raw, "masked": apply_overlay(raw, meta["overlay_box"], decode_rgb(twins[key]["overlay.png"]))}
            pair = geo.umeyama_similarity(geo.five_points_from_landmarks(np.asarray(meta["landmarks"], float)),
                                          template.points)
            for kind, photo in photos.items():
                res = al.align_standalone(photo, params=params.standalone, template=template)
                if res is None or res.crop is None:
                    missed[kind] += 1
                    continue
                found[kind].append(delta(res.matrix, pair, template.size))
    out = {"template": template.name, "every": args.every}
    for kind, rows in found.items():
        d = np.array(rows)
        shift = np.hypot(d[:, 0], d[:, 1]) * template.size / template.px_per_arcface_px
        out[kind] = {"aligned": len(rows), "missed": missed[kind],
                     "mean": {k: round(float(v), 5) for k, v in zip(("dx", "dy", "rotation_deg", "log_scale"), d.mean(0))},
                     "std": {k: round(float(v), 5) for k, v in zip(("dx", "dy", "rotation_deg", "log_scale"), d.std(0))},
                     "centre_shift_median_arcface_px": round(float(np.median(shift)), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
