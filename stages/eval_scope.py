"""DVC stage `eval_scope`: params -> data/eval_scope.json, which LFW images evaluation covers.

View 1's test people when the model trains on LFW's View 1 train people; all of LFW with an external
training set. A file rather than a param dependency, so that switching between two external sets
(the same scope, the same bytes) leaves the dlib reference embeddings cached.
"""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.evaluate.evaluation import evaluation_scope
from pipeline.data.tar_chunks import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/eval_scope.json")
    args = ap.parse_args()
    scope = evaluation_scope(load_params(args.params))
    write_json(args.out, scope)
    print(json.dumps(scope))


if __name__ == "__main__":
    main()
