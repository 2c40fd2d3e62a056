"""DVC stage `mask@<data set>`: data/<name>/ingest/ -> data/<name>/masked/ (mask overlays, binary masks,
landmarks, status)."""
from __future__ import annotations

import argparse
import json
import time

from pipeline.config import load_params
from pipeline.mask.stage import run_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dataset", default="lfw", help="a key of `datasets` in params.yaml")
    ap.add_argument("--root", default="data", help="reads and writes <root>/<dataset>/...")
    args = ap.parse_args()
    params = load_params(args.params)
    root = f"{args.root}/{args.dataset}"
    t0 = time.perf_counter()
    summary = run_mask(params=params.mask, compute=params.compute, in_dir=f"{root}/ingest",
                       out_dir=f"{root}/masked", assume_aligned=params.dataset(args.dataset).assume_aligned,
                       bank_dir=f"{args.root}/mask_bank")
    keys = ("inputs", "masked", "rejected", "landmark_route_share", "routes", "multi_face_images")
    print(json.dumps({**{k: summary[k] for k in keys}, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
