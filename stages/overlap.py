"""DVC stage `overlap`: an external training set's people vs LFW's, by face -> data/overlap.json
(what pack drops or refuses: params.yaml `overlap`)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.devices import select_device
from pipeline.evaluate.evaluation import read_scope
from pipeline.evaluate.overlap import run_overlap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--reference", default="data/reference/dlib.parquet", help="LFW's dlib embeddings")
    ap.add_argument("--scope", default="data/eval_scope.json")
    ap.add_argument("--out", default="data/overlap.json")
    args = ap.parse_args()
    params = load_params(args.params)
    out = run_overlap(params=params.overlap, external=read_scope(args.scope),
                      train_aligned=f"data/{params.train_set}/aligned", reference_path=args.reference,
                      out_path=args.out, seed=params.evaluate.seed, device=str(select_device(params.evaluate.device)))
    print(json.dumps({k: out[k] for k in ("checked", "matches", "action")}))


if __name__ == "__main__":
    main()
