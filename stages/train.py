"""DVC stage `train`: data/shards/ -> models/model.pt (best by validation), dvclive/.

The resume state of an unfinished run waits in checkpoints/train/ (not a DVC output; deleted when
the run finishes), so a killed `dvc repro` continues where it stopped.

With train.nproc_per_node N > 1 it starts N DDP ranks of itself through torchrun (so one
`dvc repro` trains on every GPU of a box); every rank runs this, rank 0 writes.
"""
from __future__ import annotations

import argparse
import json

import sys

from pipeline.config import load_params
from pipeline.train.loop import launch_ranks, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--out", default="models")
    ap.add_argument("--live", default="dvclive")
    ap.add_argument("--resume-dir", default="checkpoints/train")
    args = ap.parse_args()
    params = load_params(args.params)
    rc = launch_ranks(params.train, "stages.train", sys.argv[1:], args.shards)
    if rc is not None:
        sys.exit(rc)
    summary = train(params=params.train, shards_dir=args.shards, out_dir=args.out, live_dir=args.live,
                    resume_dir=args.resume_dir, evaluate=params.evaluate, validate=params.validation)
    if summary["rank"] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
