"""Validation figures of trained models, for choosing a recipe on held-out train people, not on test.

Runs the train stage's own validator (pipeline.training.Validator: masked-unmasked and unmasked
verification on the val shards, gallery rank-1 with unmasked and masked probes) on each model:
a models/model.pt path, or a git revision (an experiment's, e.g. from `dvc exp show`), whose
dvc.lock names the model in the DVC cache. `dlib` scores the starting network. One JSON line each.

  python scripts/validate_models.py dlib models/model.pt <exp-rev> ... [--shards data/shards]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.devices import select_device  # noqa: E402
from pipeline.embedders import make_embedder  # noqa: E402
from pipeline.training import Validator, autocast_for, read_shard_set  # noqa: E402

CACHE = Path(".dvc/cache/files/md5")


def cached_model(rev: str) -> Path:
    """models/model.pt of the train stage in ``rev``'s dvc.lock, from the DVC cache."""
    shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"{rev!r} is neither a model file nor a git revision with a dvc.lock: "
                         f"{shown.stderr.strip()}")
    lock = yaml.safe_load(shown.stdout)
    outs = lock["stages"]["train"]["outs"]
    md5 = next(o["md5"] for o in outs if o["path"] == "models")
    manifest = json.loads((CACHE / md5[:2] / md5[2:]).read_text())
    file_md5 = next(e["md5"] for e in manifest if e["relpath"] == "model.pt")
    return CACHE / file_md5[:2] / file_md5[2:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="dlib | a model.pt path | a git revision")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params).train
    device = select_device(params.device)
    shards = read_shard_set(Path(args.shards))
    validator = Validator(shards.val, params, device, autocast_for(device, params.bf16), batch_size=128)
    for name in args.models:
        spec = name if name == "dlib" or Path(name).is_file() else str(cached_model(name))
        net = make_embedder(spec, device=str(device), template=shards.template).model
        with torch.no_grad():
            out = validator(net)
        print(json.dumps({"model": name, **{k: round(v, 5) for k, v in out.items()}}), flush=True)


if __name__ == "__main__":
    main()
