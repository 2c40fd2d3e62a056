"""DVC stage `mask`: data/ingest/ -> data/masked/ (masked twins, binary masks, landmarks, status)."""
from __future__ import annotations

import argparse
import json
import time

from pipeline.config import load_params
from pipeline.mask.stage import run_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--in", dest="in_dir", default="data/ingest")
    ap.add_argument("--out", default="data/masked")
    args = ap.parse_args()
    params = load_params(args.params)
    t0 = time.perf_counter()
    summary = run_mask(params=params.mask, compute=params.compute, in_dir=args.in_dir, out_dir=args.out)
    keys = ("inputs", "masked", "rejected", "landmark_route_share", "routes", "multi_face_images")
    print(json.dumps({**{k: summary[k] for k in keys}, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
