"""DVC stage `embed_reference`: dlib's pretrained ResNet (its torch port) embeds the evaluated
aligned LFW twins once.

Separate from `evaluate` because it does not depend on the trained model: DVC caches it, so
changing a training parameter reruns only train and evaluate.
"""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.evaluate.evaluation import read_scope, run_embed_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--aligned", default="data/lfw/aligned")
    ap.add_argument("--scope", default="data/eval_scope.json", help="the eval_scope stage's output")
    ap.add_argument("--out", default="data/reference/dlib.parquet")
    args = ap.parse_args()
    params = load_params(args.params)
    summary = run_embed_reference(params=params.evaluate, all_lfw=read_scope(args.scope),
                                  aligned_dir=args.aligned, out_path=args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
