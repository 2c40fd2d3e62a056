"""DVC stage `align`: data/ingest + data/masked -> data/aligned/ (112x112 raw/masked twins)."""
from __future__ import annotations

import argparse
import json

from pipeline.align.stage import run_align
from pipeline.config import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ingest", default="data/ingest")
    ap.add_argument("--masked", default="data/masked")
    ap.add_argument("--out", default="data/aligned")
    args = ap.parse_args()
    params = load_params(args.params)
    summary = run_align(params=params.align, compute=params.compute, ingest_dir=args.ingest,
                        masked_dir=args.masked, out_dir=args.out)
    print(json.dumps({k: summary[k] for k in ("inputs", "aligned", "rejected", "cascade_share", "routes")}))


if __name__ == "__main__":
    main()
