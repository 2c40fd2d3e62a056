"""DVC stage `validate`: trained model + the val shards (held-out train people) -> validation/metrics.json.

Every choice is read from this file (or scripts/validate_models.py), never from eval/.
"""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.evaluate.validation import SELECTION, run_validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards", help="val-*.tar and index.json")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--masked", help="default: data/<train_set>/masked (mask types and coverage: by_mask.*)")
    ap.add_argument("--out", default="validation")
    args = ap.parse_args()
    params = load_params(args.params)
    metrics = run_validate(evaluate=params.evaluate, validate=params.validation, shards_dir=args.shards,
                           model_path=args.model, out_dir=args.out,
                           masked_dir=args.masked or f"data/{params.train_set}/masked")
    section, cond, key = SELECTION
    print(json.dumps({"identities": metrics["identities"], "pairs": metrics["pairs"],
                      f"{cond}.{key}": metrics[section][cond][key], "resolution": metrics["resolution"]}))


if __name__ == "__main__":
    main()
