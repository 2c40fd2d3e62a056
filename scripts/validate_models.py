"""Validation figures of trained models, for choosing a recipe on held-out train people, not on test.

Runs the train stage's own validator (pipeline.training.Validator: masked-unmasked and unmasked
verification on the val shards, gallery rank-1 with unmasked and masked probes) on each model:
a models/model.pt path, or a git revision (an experiment's, e.g. from `dvc exp show`), whose
dvc.lock names the model in the DVC cache. `dlib` scores the starting network. One JSON line each.
The val pairs are those of a seed-0 run (``--val-seed``), whatever params.yaml's train.seed says.

``--alphas 1,0.8,0.7`` also scores each fine-tuned dlib_resnet model moved back towards dlib's
start (train.wise_alpha, WiSE-FT) without retraining; ``wise_alpha`` in the output is the
effective one (a model written with wise_alpha a and moved by b lies at a x b). ``--test`` adds the
evaluate stage's figures on LFW (gallery rank-1 per mask portion, View 1 DevTest and View 2 unseen
pairs; View 1 is LFW's development view); ``--markdown`` ends with a table, mean +- sample std over
the models at each alpha.

  python scripts/validate_models.py dlib models/model.pt <exp-rev> ... [--shards data/shards]
  python scripts/validate_models.py dlib <rev> <rev> ... --alphas 1,0.9,0.8,0.7,0.6 --test --markdown
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

from pipeline.config import TrainParams, load_params  # noqa: E402
from pipeline.devices import select_device  # noqa: E402
from pipeline.embedders import TorchEmbedder, make_embedder  # noqa: E402
from pipeline.evaluation import embed_aligned, read_train_identities, score_embeddings  # noqa: E402
from pipeline.models import interpolate_weights  # noqa: E402
from pipeline.training import ShardSet, Validator, autocast_for, read_shard_set  # noqa: E402
from table1 import CONDITIONS as CONDITION_KEYS, TITLES, cell  # noqa: E402  (scripts/, beside this file)

CACHE = Path(".dvc/cache/files/md5")
CONDITIONS = {TITLES[f"{k}.accuracy"]: k for k in CONDITION_KEYS}  # u-u, m-u, m-m -> metric names
VAL_COLUMNS = {"accuracy": "val m-u", "rank1_raw": "val rank-1 raw", "rank1_masked": "val rank-1 masked"}


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


def make_validator(params: TrainParams, shards: ShardSet, device: torch.device, val_seed: int) -> Validator:
    """The train stage's validator, its val pairs drawn from ``val_seed``, not from params.yaml's
    train.seed (which in a workspace holds whichever experiment was applied last)."""
    params = params.model_copy(update={"seed": val_seed})
    return Validator(shards.val, params, device, autocast_for(device, params.bf16), batch_size=128)


def lfw_test_figures(net: torch.nn.Module, args, params, train_ids: set[str]) -> dict:
    """What the evaluate stage reports for ``net`` (fractions), on the aligned LFW test people."""
    embedder = TorchEmbedder(net=net, device=str(next(net.parameters()).device))
    emb = embed_aligned(embedder, args.aligned, flip=params.flip, batch_size=params.batch_size)
    m, _ = score_embeddings(emb, params=params, protocol_dir=args.protocol, train_identities=train_ids)
    out = {"rank1": m["gallery"]["rank1"],
           "V1": {c: m["verification"][k]["accuracy"] for c, k in CONDITIONS.items()}}
    if "verification_view2_unseen" in m:
        out["V2u"] = {c: m["verification_view2_unseen"][k]["accuracy"] for c, k in CONDITIONS.items()}
    return out


def flat(row: dict) -> dict[str, float]:
    """Column title -> value (fraction) of one output line."""
    out = {title: row[k] for k, title in VAL_COLUMNS.items()}
    test = row.get("test", {})
    out |= {f"rank-1 {p.removeprefix('mask_')}": v for p, v in test.get("rank1", {}).items()}
    for view in ("V1", "V2u"):
        out |= {f"{view} {c}": v for c, v in test.get(view, {}).items()}
    return out


def markdown(rows: list[dict]) -> str:
    """One line per (dlib | wise_alpha): mean +- sample std over the models there, in percent."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault("dlib" if r["model"] == "dlib" else f"{r['wise_alpha']:g}", []).append(flat(r))
    columns = list(next(iter(groups.values()))[0])
    lines = ["| wise_alpha | models | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    order = sorted(groups, key=lambda g: (g == "dlib", -float(g) if g != "dlib" else 0))
    for g in order:
        cells = [cell([f[c] for f in groups[g]]) for c in columns]
        lines.append(f"| {g} | {len(groups[g])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="dlib | a model.pt path | a git revision")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--val-seed", type=int, default=0,
                    help="draws the val pairs (the train stage uses train.seed: 0 = the default run's pairs)")
    ap.add_argument("--alphas", default="1", help="comma-separated, each in (0, 1]: weight of the fine-tuning")
    ap.add_argument("--test", action="store_true", help="also the evaluate stage's LFW test figures")
    ap.add_argument("--aligned", default="data/lfw/aligned")
    ap.add_argument("--protocol", default="data/lfw/ingest/protocol")
    ap.add_argument("--markdown", action="store_true", help="end with a table over the models per alpha")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if not all(0 < a <= 1 for a in alphas):
        raise SystemExit(f"--alphas: each must lie in (0, 1], got {args.alphas}")
    all_params = load_params(args.params)
    device = select_device(all_params.train.device)
    shards = read_shard_set(Path(args.shards))
    validator = make_validator(all_params.train, shards, device, args.val_seed)
    train_ids = read_train_identities(args.shards) if args.test else set()
    start = make_embedder("dlib", device=str(device), template=shards.template).model
    start_weights = {k: v.detach().clone() for k, v in start.state_dict().items()}
    rows = []
    for name in args.models:
        spec = name if name == "dlib" or Path(name).is_file() else str(cached_model(name))
        net = make_embedder(spec, device=str(device), template=shards.template).model
        written = 1.0
        if name != "dlib":
            written = torch.load(spec, map_location="cpu", weights_only=True)["meta"].get("wise_alpha", 1.0)
        tuned = {k: v.detach().clone() for k, v in net.state_dict().items()}
        for alpha in [1.0] if name == "dlib" else alphas:
            if alpha < 1:
                if net.config["backbone"] != "dlib_resnet":
                    raise SystemExit(f"{name}: --alphas below 1 need a model fine-tuned from dlib's network")
                net.load_state_dict(interpolate_weights(start_weights, tuned, alpha))
            with torch.no_grad():
                row = {"model": name, "wise_alpha": round(written * alpha, 6),
                       **{k: round(v, 5) for k, v in validator(net).items()}}
                if args.test:
                    row["test"] = lfw_test_figures(net, args, all_params.evaluate, train_ids)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
