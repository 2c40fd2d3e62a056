"""DVC stage `align@<data set>`: data/<name>/ingest + masked -> data/<name>/aligned/ (twin crops on align.template)."""
from __future__ import annotations

import argparse
import json

from pipeline.align.stage import run_align
from pipeline.config import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dataset", default="lfw", help="a key of `datasets` in params.yaml")
    ap.add_argument("--root", default="data", help="reads and writes <root>/<dataset>/...")
    args = ap.parse_args()
    params = load_params(args.params)
    root = f"{args.root}/{args.dataset}"
    summary = run_align(params=params.align, compute=params.compute, ingest_dir=f"{root}/ingest",
                        masked_dir=f"{root}/masked", out_dir=f"{root}/aligned",
                        assume_aligned=params.dataset(args.dataset).assume_aligned, standalone=params.standalone)
    print(json.dumps({k: summary[k] for k in ("inputs", "aligned", "rejected", "cascade_share", "routes")}))


if __name__ == "__main__":
    main()
