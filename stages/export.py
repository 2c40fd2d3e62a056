"""DVC stage `export`: models/model.pt -> models/model.onnx (preprocessing in its metadata) and
eval/export.json (what was written; its cosine to the checkpoint on real validation crops)."""
from __future__ import annotations

import argparse
import json

from pipeline.config import load_params
from pipeline.recognition.export import run_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--shards", default="data/shards", help="val-*.tar: the crops the export is checked on")
    ap.add_argument("--out", default="models/model.onnx")
    ap.add_argument("--report", default="eval/export.json")
    args = ap.parse_args()
    params = load_params(args.params)
    report = run_export(params=params.export, flip=params.evaluate.flip, model_path=args.model,
                        shards_dir=args.shards, out_path=args.out, report_path=args.report)
    print(json.dumps({"onnx": args.out, "bytes": report["bytes"], **report.get("check", {})}))


if __name__ == "__main__":
    main()
