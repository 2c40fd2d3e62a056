"""Validation figures of trained models, for choosing a recipe on held-out train people: never test.

Scores each model as the validate stage does (pipeline.evaluate.validation: the val shards' people through
evaluate's embedder path and scoring, 95% intervals from the bootstrap over identities), and the
paired difference to dlib's network on the same pairs and probes. A model is a models/model.pt
path (or an ONNX export, models/model.onnx, scored as it is by onnxruntime), or a git revision
(an experiment's, e.g. from `dvc exp show`) whose dvc.lock names the model in the DVC cache. `dlib` is the starting network and the reference. One JSON line per model.

Each model is scored as written (at the train.wise_alpha it was written with, shown in the
``wise_alpha`` column). ``--alphas 1,0.8,0.7`` scores each fine-tuned dlib_resnet model at these train.wise_alpha values
(WiSE-FT: start + alpha x (fine-tuned - start)) without retraining: a model the train stage wrote
at wise_alpha a lies on that line already, so alpha b is start + (b / a) x (model - start) (above
1 for b > a: back towards the fine-tuned net it was moved from, exact up to float rounding).

The rule that picks (``chosen`` at the end): the highest validation masked-unmasked accuracy among
the candidates whose unmasked accuracy and unmasked rank-1 are not worse than dlib's (the paired
interval of the difference does not lie below 0); then the paired difference between the chosen
candidate and the runner-up, with its interval, says whether the choice is resolved or within
noise. ``--markdown`` ends with a table, best first. Test figures are not printed: the chosen
recipe's are scored once, by `dvc repro` (evaluate stage).

  python scripts/validate_models.py dlib models/model.pt <exp-rev> ... [--shards data/shards]
  python scripts/validate_models.py models/model.pt <exp-rev> --alphas 1,0.9,0.8,0.7,0.6,0.5 --markdown
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

from pipeline.bootstrap import paired_difference  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.devices import select_device  # noqa: E402
from pipeline.recognition.embedders import TorchEmbedder, make_embedder  # noqa: E402
from pipeline.evaluate.evaluation import figure_at, paired_comparison, round_metrics  # noqa: E402
from pipeline.recognition.models import interpolate_weights  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402
from pipeline.evaluate.validation import SELECTION, embed_validation, score_validation  # noqa: E402

CACHE = Path(".dvc/cache/files/md5")
# column title -> path in the validation metrics
COLUMNS = {"u-u": ("verification", "unmasked_unmasked", "accuracy"),
           "m-u": ("verification", "masked_unmasked", "accuracy"),
           "m-m": ("verification", "masked_masked", "accuracy")}
# columns a candidate must not lose against dlib (forgetting on unmasked faces)
GUARDS = ("u-u", "rank-1 0")


def cached_model(rev: str) -> Path:
    """models/model.pt of the train stage in ``rev``'s dvc.lock, from the DVC cache."""
    if rev.startswith("-"):  # `--output=x` would be read by git as an option
        raise SystemExit(f"{rev!r} is neither a model file nor a git revision")
    shown = subprocess.run(["git", "show", "--end-of-options", f"{rev}:dvc.lock"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"{rev!r} is neither a model file nor a git revision with a dvc.lock: "
                         f"{shown.stderr.strip()}")
    lock = yaml.safe_load(shown.stdout)
    outs = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}
    if "models/model.pt" in outs:  # the file itself (since the export stage writes models/model.onnx)
        md5 = outs["models/model.pt"]
        return CACHE / md5[:2] / md5[2:]
    md5 = outs["models"]  # older locks: the whole folder
    manifest = json.loads((CACHE / md5[:2] / md5[2:]).read_text())
    file_md5 = next(e["md5"] for e in manifest if e["relpath"] == "model.pt")
    return CACHE / file_md5[:2] / file_md5[2:]


def along_line(start: dict[str, torch.Tensor], model: dict[str, torch.Tensor], factor: float) -> dict:
    """start + factor x (model - start), float tensors only; factor may exceed 1 (see --alphas)."""
    if factor <= 1:
        return interpolate_weights(start, model, factor)
    return {k: start[k] + factor * (v - start[k]) if v.is_floating_point() else v for k, v in model.items()}


def columns(metrics: dict) -> dict[str, tuple[str, ...]]:
    return {**COLUMNS, **{f"rank-1 {p.removeprefix('mask_')}": ("gallery", "rank1", p)
                          for p in metrics["gallery"]["rank1"]}}


def _ci_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """Where a figure's interval is: next to it (verification) or in a sibling <name>_ci dict (gallery)."""
    return (*path[:-1], f"{path[-1]}_ci") if path[0] == "verification" else (path[0], f"{path[1]}_ci", path[2])


def row_of(name: str, alpha: float, scored: tuple[dict, dict], dlib: tuple[dict, dict], level: float) -> dict:
    """One output line: each column's figure with its interval, and the paired difference to dlib."""
    m = scored[0]
    vs = paired_comparison(scored, dlib, level)
    cols = {}
    for title, path in columns(m).items():
        ci = figure_at(m, _ci_path(path))
        cols[title] = {"value": figure_at(m, path), **({"low": ci["low"], "high": ci["high"]} if ci else {}),
                       "vs_dlib": figure_at(vs, path)}
    return round_metrics({"model": name, "wise_alpha": alpha, "identities": m["identities"], "pairs": m["pairs"],
                          "validation": cols})


def admissible(row: dict) -> bool:
    """Not worse than dlib on unmasked faces (a paired interval wholly below 0 rules a model out)."""
    return all((row["validation"][g]["vs_dlib"] or {}).get("verdict", 0) >= 0
               for g in GUARDS if g in row["validation"])


def choose(rows: list[dict], scored: dict[int, tuple[dict, dict]], level: float) -> dict | None:
    """The rule of the module docstring, applied to the fine-tuned candidates (not dlib)."""
    cands = sorted((i for i, r in enumerate(rows) if r["model"] != "dlib" and admissible(r)),
                   key=lambda i: -figure_at(scored[i][0], SELECTION))
    if not cands:
        return None
    best = cands[0]
    out = {"chosen": {"model": rows[best]["model"], "wise_alpha": rows[best]["wise_alpha"]},
           "rule": "max validation masked-unmasked accuracy; unmasked accuracy and rank-1 not worse than dlib"}
    if len(cands) > 1:
        (a, ea), (b, eb) = scored[best], scored[cands[1]]
        d = paired_difference(figure_at(a, SELECTION), figure_at(b, SELECTION), ea["replicates"][SELECTION],
                              eb["replicates"][SELECTION], level)
        out["vs_runner_up"] = {"model": rows[cands[1]]["model"], "wise_alpha": rows[cands[1]]["wise_alpha"],
                               **(d or {"diff": None, "note": "too few people to resample"})}
    return round_metrics(out)


def _cell(c: dict) -> str:
    if c["value"] is None:
        return "n/a"
    s = f"{100 * c['value']:.1f}" + (f" [{100 * c['low']:.1f}, {100 * c['high']:.1f}]" if "low" in c else "")
    d = c.get("vs_dlib")
    return s + (f" ({100 * d['diff']:+.1f}{'*' if d['verdict'] else ''})" if d else "")


def markdown(rows: list[dict]) -> str:
    """One line per (model, alpha), best validation m-u first: figure [95% CI] (difference to dlib,
    * where its paired interval excludes 0)."""
    titles = list(rows[0]["validation"])
    lines = ["| model | wise_alpha | " + " | ".join(f"val {t}" for t in titles) + " |",
             "|---" * (len(titles) + 2) + "|"]
    for r in sorted(rows, key=lambda r: -(r["validation"]["m-u"]["value"] or 0)):
        lines.append(f"| {Path(r['model']).name} | {'-' if r['wise_alpha'] is None else format(r['wise_alpha'], 'g')} | "
                     + " | ".join(_cell(r["validation"][t]) for t in titles) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="dlib | a model.pt path | a git revision")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--params", default="params.yaml", help="its evaluate and validation sections score")
    ap.add_argument("--alphas", default=None, help="comma-separated, each in (0, 1]: weight of the fine-tuning "
                                                    "(default: each model as written)")
    ap.add_argument("--markdown", action="store_true", help="end with a table, best validation m-u first")
    args = ap.parse_args(argv)
    alphas = None if args.alphas is None else [float(a) for a in args.alphas.split(",")]
    if alphas is not None and not all(0 < a <= 1 for a in alphas):
        raise SystemExit(f"--alphas: each must lie in (0, 1], got {args.alphas}")
    params = load_params(args.params)
    ev, va = params.evaluate, params.validation
    device = str(select_device(ev.device))
    template = read_shard_set(args.shards).template

    def score(embedder) -> tuple[dict, dict]:
        return score_validation(embed_validation(embedder, args.shards, params=ev, device=device),
                                evaluate=ev, validate=va)

    dlib_net = make_embedder("dlib", device=device, template=template)
    start_weights = {k: v.detach().clone() for k, v in dlib_net.model.state_dict().items()}
    dlib = score(dlib_net)
    rows, scored = [], {}
    for name in args.models:
        spec = name if name == "dlib" or Path(name).is_file() else str(cached_model(name))
        if name == "dlib":
            runs = [(1.0, dlib)]
        elif Path(spec).suffix.lower() == ".onnx":  # an export (pipeline.recognition.export), run by onnxruntime as it is
            runs = [(None, score(make_embedder(spec)))]
        else:
            net = make_embedder(spec, device=device, template=template).model
            written = torch.load(spec, map_location="cpu", weights_only=True)["meta"].get("wise_alpha", 1.0)
            tuned = {k: v.detach().clone() for k, v in net.state_dict().items()}
            runs = []
            for alpha in alphas or [written]:
                if alpha != written and net.config["backbone"] != "dlib_resnet":
                    raise SystemExit(f"{name}: --alphas other than its own ({written}) need a model fine-tuned "
                                     f"from dlib's network")
                net.load_state_dict(along_line(start_weights, tuned, alpha / written))
                runs.append((alpha, score(TorchEmbedder(net=net, device=device))))
        for alpha, result in runs:
            scored[len(rows)] = result
            rows.append(row_of(name, None if alpha is None else round(alpha, 6), result, dlib, ev.ci_level))
            print(json.dumps(rows[-1]), flush=True)
    picked = choose(rows, scored, ev.ci_level)
    if picked:
        print(json.dumps(picked), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
