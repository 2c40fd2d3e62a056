"""DVC stage `pair_benchmark@<name>`: a folder of photos + an LFW-format pairs file (params.yaml
pair_benchmarks.<name>) -> eval/benchmarks/<name>/ (metrics.json, photos.parquet)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.devices import select_device
from pipeline.evaluate.pair_benchmark import run_pair_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--name", required=True, help="a key of params.yaml's pair_benchmarks")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--out", help="default: eval/benchmarks/<name>")
    args = ap.parse_args()
    params = load_params(args.params)
    if args.name not in params.pair_benchmarks:
        raise SystemExit(f"pair_benchmarks has no {args.name!r}; it has {sorted(params.pair_benchmarks)}")
    m = run_pair_benchmark(name=args.name, benchmark=params.pair_benchmarks[args.name], evaluate=params.evaluate,
                           standalone=params.standalone, model_path=args.model,
                           out_dir=args.out or f"eval/benchmarks/{args.name}",
                           device=str(select_device(params.evaluate.device)))
    print(json.dumps({"pairs": m["pairs"], "pairs_failed": m["pairs_failed"], "accuracy": m["model"]["accuracy"],
                      "dlib_accuracy": m.get("reference", {}).get("dlib", {}).get("accuracy")}))


if __name__ == "__main__":
    main()
