"""DVC stage `evaluate`: trained model + aligned test pairs -> eval/ (metrics.json, plot data, PNGs)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.evaluate.evaluation import read_scope, run_evaluate, training_set_info
from pipeline.pack.stage import read_overlap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--aligned", default="data/lfw/aligned")
    ap.add_argument("--masked", default="data/lfw/masked", help="mask types and coverage (by_mask.*)")
    ap.add_argument("--shards", default="data/shards", help="classes.json + index.json (training and validation identities)")
    ap.add_argument("--protocol", default="data/lfw/ingest/protocol")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--reference", default="data/reference/dlib.parquet")
    ap.add_argument("--scope", default="data/eval_scope.json", help="the eval_scope stage's output")
    ap.add_argument("--thresholds", default="validation/thresholds.json", help="the validate stage's 1:N thresholds")
    ap.add_argument("--overlap", default="data/overlap.json", help="the overlap stage's finding")
    ap.add_argument("--out", default="eval")
    args = ap.parse_args()
    params = load_params(args.params)
    metrics = run_evaluate(params=params.evaluate, aligned_dir=args.aligned, shards_dir=args.shards,
                           training_set={**training_set_info(params), "external": read_scope(args.scope)},
                           protocol_dir=args.protocol, model_path=args.model, out_dir=args.out,
                           reference_path=args.reference, masked_dir=args.masked,
                           thresholds_path=args.thresholds, overlap=read_overlap(args.overlap))
    brief = {"gallery.rank1": metrics["gallery"]["rank1"],
             "verification.accuracy": {c: v["accuracy"] for c, v in metrics["verification"].items()}}
    b = metrics["by_mask"]["verification_masked_unmasked"]
    brief["by_mask.masked_unmasked"] = {k: b[k] for k in ("seen", "unseen", "seen_minus_unseen")}
    if "reference" in metrics:
        brief["reference.dlib.gallery.rank1"] = metrics["reference"]["dlib"]["gallery"]["rank1"]
    print(json.dumps(brief))


if __name__ == "__main__":
    main()
