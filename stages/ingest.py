"""DVC stage `ingest@<data set>`: a source data set -> data/<name>/ingest/ (raw chunks, manifest, summary)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.data.ingest import run_ingest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dataset", default="lfw", help="a key of `datasets` in params.yaml")
    ap.add_argument("--root", default="data", help="writes <root>/<dataset>/ingest")
    args = ap.parse_args()
    params = load_params(args.params)
    summary = run_ingest(params=params.ingest, dataset=params.dataset(args.dataset), compute=params.compute,
                         out_dir=f"{args.root}/{args.dataset}/ingest")
    print(json.dumps({k: summary[k] for k in ("inputs", "accepted", "rejected", "identities")}))


if __name__ == "__main__":
    main()
