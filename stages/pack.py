"""DVC stage `pack`: data/aligned -> data/shards/ (WebDataset train/val shards, classes, index)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.pack.stage import read_overlap, run_pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--aligned", help="default: data/<train_set>/aligned")
    ap.add_argument("--masked", help="default: data/<train_set>/masked (mask types, for pack.unseen_mask_types)")
    ap.add_argument("--overlap", default="data/overlap.json", help="the overlap stage's finding")
    ap.add_argument("--out", default="data/shards")
    args = ap.parse_args()
    params = load_params(args.params)
    index = run_pack(params=params.pack, aligned_dir=args.aligned or f"data/{params.train_set}/aligned",
                     masked_dir=args.masked or f"data/{params.train_set}/masked", out_dir=args.out,
                     compute=params.compute, overlap=read_overlap(args.overlap))
    print(json.dumps({"classes": index["classes"], "train": index["train"]["samples"],
                      "train_shards": len(index["train"]["shards"]), "val": index["val"]["samples"],
                      "val_identities": len(index["val"]["identities"]),
                      "held_out_unseen_mask_types": index["held_out_mask_types"]["images"],
                      "overlap_dropped": len(index.get("overlap_dropped", {}).get("identities", []))}))


if __name__ == "__main__":
    main()
