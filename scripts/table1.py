"""The report's Table 1 from DVC experiments: with and without distillation, mean +- std over seeds,
on the VALIDATION people (each experiment's validation/metrics.json; test figures are never read:
a sweep of methods is a choice, and test is scored once, for the chosen recipe, by evaluate).

    dvc exp show --json > exps.json && python scripts/table1.py exps.json
    python scripts/table1.py            # runs `dvc exp show --json` itself
    dvc exp show -A --json | python scripts/table1.py - --assume train.arcface.init=auto

Experiments are grouped by every parameter except the training seed (so runs that differ in
anything else never get averaged together); each group is a row named by its method (ArcFace when
train.distill.kind is none or beta is 0). Cells are mean +- sample std (n-1) in percent over the
group's seeds. A seed that appears twice in a group (the same run shown at several commits, e.g. with
`-A`) counts once: the newest listing is kept and the others are named on stderr. ``--assume
KEY=VALUE`` fills a param that older runs lack with the value they ran with (a param added later),
so they group with the runs that have it. ``--min-seeds N`` leaves out groups with fewer seeds
(single exploratory runs listed in the same range of commits). The dlib reference row (same for
every run) is added when the metrics hold it.
Below the table, each distillation row is compared with the row of the same start without
distillation: difference of means and whether it exceeds 2 sample std.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

CONDITIONS = ("unmasked_unmasked", "masked_unmasked", "masked_masked")
DEFAULT_COLUMNS = (("gallery.rank1.mask_0", "gallery.rank1.mask_0.5", "gallery.rank1.mask_1.0")
                   + tuple(f"verification.{c}.accuracy" for c in CONDITIONS))
# short column titles for the markdown table
TITLES = {"gallery.rank1.": "val rank-1 ", "verification.": "val ",
          "unmasked_unmasked.accuracy": "u-u", "masked_unmasked.accuracy": "m-u", "masked_masked.accuracy": "m-m"}
SEED_KEYS = ("train.seed",)
METRICS_FILE = "validation/metrics.json"  # never eval/: see the docstring


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def experiments(exp_show: list, metrics_file: str = METRICS_FILE) -> list[dict]:
    """[{rev, name, params (flat), metrics (flat)}] of every committed baseline and experiment with
    ``metrics_file``; the workspace is skipped (it repeats the last applied experiment)."""
    records, seen = [], set()

    def add(entry: dict) -> None:
        data = entry.get("data") or {}
        rev = data.get("rev") or entry.get("rev")
        if rev in (None, "workspace") or rev in seen or entry.get("error"):
            return
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if not metrics or params is None:
            return
        seen.add(rev)
        records.append({"rev": rev, "name": entry.get("name") or rev[:7], "params": flatten(params),
                        "metrics": flatten(metrics)})

    for base in exp_show:
        add(base)
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev)
    return records


def method_label(params: dict) -> str:
    """What a run trained: its start, then its loss terms ("ArcFace" alone = no distillation),
    then the move back towards the start (WiSE-FT) when there was one. Older experiments (before
    these params existed) read as ArcFace from scratch."""
    start = {"dlib": "dlib fine-tuned", "imagenet": "ImageNet start", "none": "from scratch"}.get(
        params.get("train.pretrained", "none"), params.get("train.pretrained"))
    arcface = params.get("train.arcface.weight", 1.0)
    kind, beta = params.get("train.distill.kind", "none"), params.get("train.distill.beta", 0)
    terms = ["ArcFace"] if arcface else []
    if kind != "none" and beta:
        if params.get("train.distill.teacher", "self") == "frozen":
            terms.append(f"frozen teacher ({kind}, beta={beta:g}, raw={params.get('train.distill.raw_weight', 1.0):g})")
        else:
            extra = ", dynamic" if params.get("train.distill.dynamic") else ""
            terms.append(f"self distillation ({kind}, beta={beta:g}{extra})")
    wise = params.get("train.wise_alpha", 1.0)
    return f"{start}: " + (" + ".join(terms) or "nothing") + (f", WiSE-FT alpha={wise:g}" if wise < 1 else "")


def _freeze(v):
    """A hashable form of a param value; 0 and 0.0 (`-S key=0` against params.yaml's 0.0) are one."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v, sort_keys=True)


def group(records: list[dict], assume: dict | None = None, min_seeds: int = 1) -> list[tuple[str, list[dict]]]:
    groups: dict[tuple, dict[tuple, dict]] = {}  # params but seed -> seed -> first run listed
    for r in records:
        params = {**(assume or {}), **r["params"]}
        key = tuple(sorted((k, _freeze(v)) for k, v in params.items() if k not in SEED_KEYS))
        seed = tuple(_freeze(params.get(k)) for k in SEED_KEYS)
        twin = groups.setdefault(key, {}).setdefault(seed, r)
        if twin is not r:  # the same run listed again (another commit): one seed counts once
            same = "same metrics" if twin["metrics"] == r["metrics"] else "OTHER metrics"
            print(f"note: {r['name']} repeats {twin['name']}'s params and seed ({same}); counted once",
                  file=sys.stderr)
    labelled = [(method_label(first["params"]), key, list(by_seed.values()))
                for key, by_seed in groups.items() if len(by_seed) >= min_seeds
                for first in [next(iter(by_seed.values()))]]
    # two groups with the same method name: add the parameters that tell them apart
    out = []
    for label, key, rs in labelled:
        twins = [k for lab, k, _ in labelled if lab == label and k != key]
        if twins:
            mine = dict(key)
            differ = sorted({p for t in twins for p, v in t if mine.get(p) != v} |
                            {p for t in twins for p in mine if p not in dict(t)})
            label += " [" + ", ".join(f"{p}={json.loads(mine[p]) if p in mine else '-'}" for p in differ) + "]"
        out.append((label, rs))
    return sorted(out, key=lambda x: ("distill" in x[0] or "teacher" in x[0], x[0]))


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100.0 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def build_table(exp_show: list, columns=DEFAULT_COLUMNS, assume: dict | None = None,
                min_seeds: int = 1) -> list[dict]:
    rows = []
    records = experiments(exp_show)
    for label, rs in group(records, assume, min_seeds):
        row = {"method": label, "seeds": len(rs),
               "seed_values": sorted({r["params"].get("train.seed") for r in rs}, key=str)}
        for c in columns:
            row[c] = [r["metrics"][c] for r in rs if isinstance(r["metrics"].get(c), (int, float))]
        rows.append(row)
    ref = [r["metrics"] for r in records if f"reference.dlib.{columns[0]}" in r["metrics"]]
    if ref:
        row = {"method": "dlib ResNet (pretrained, mask-unaware reference)", "seeds": 0, "seed_values": []}
        for c in columns:
            vals = sorted({m.get(f"reference.dlib.{c}") for m in ref} - {None})
            if len(vals) > 1:  # the same evaluation for every run, unless the runs differ in what they score
                print(f"note: the dlib reference differs between runs for {c}: {vals} (shown as mean ± std)",
                      file=sys.stderr)
            row[c] = vals
        rows.append(row)
    return rows


def title(column: str) -> str:
    for long, short in TITLES.items():
        column = column.replace(long, short)
    return column


def compare(rows: list[dict], columns=DEFAULT_COLUMNS) -> list[dict]:
    """Each distillation row against the row without distillation that has the same start: per
    column the difference of means (points) and whether it exceeds 2 sample std (the larger of
    the two rows'), the bar for "beats no distillation"."""
    def start(label: str) -> str:
        return label.split(":")[0]

    base = {start(r["method"]): r for r in rows if r["seeds"] > 1 and r["method"].endswith(": ArcFace")}
    out = []
    for r in rows:
        b = base.get(start(r["method"]))
        if b is None or r is b or r["seeds"] < 2 or "distillation" not in r["method"] and "teacher" not in r["method"]:
            continue
        cells = {}
        for c in columns:
            x, y = [100.0 * v for v in r[c]], [100.0 * v for v in b[c]]
            if len(x) < 2 or len(y) < 2:
                continue
            diff = statistics.mean(x) - statistics.mean(y)
            bar = 2 * max(statistics.stdev(x), statistics.stdev(y))
            cells[c] = {"diff": round(diff, 2), "two_std": round(bar, 2), "beats": diff > bar}
        out.append({"method": r["method"], "against": b["method"], "columns": cells})
    return out


def comparison_markdown(comparisons: list[dict], columns=DEFAULT_COLUMNS) -> str:
    if not comparisons:
        return ""
    head = ["distillation vs none"] + [title(c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cmp in comparisons:
        cells = []
        for c in columns:
            v = cmp["columns"].get(c)
            cells.append("-" if v is None else f"{v['diff']:+.1f} ({'>' if v['beats'] else '<='} {v['two_std']:.1f})")
        lines.append("| " + " | ".join([cmp["method"]] + cells) + " |")
    return ("\nDifference of means in points against the same start without distillation; in brackets "
            "2 sample std (the larger row's): '>' = beats no distillation by more than 2 std.\n\n"
            + "\n".join(lines) + "\n")


def to_markdown(rows: list[dict], columns=DEFAULT_COLUMNS) -> str:
    head = ["method", "seeds"] + [title(c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = str(r["seeds"]) if r["seeds"] else "-"
        cells = [cell(r[c]) + (f" ({len(r[c])} of {r['seeds']} seeds)" if r["seeds"] and 0 < len(r[c]) < r["seeds"]
                               else "") for c in columns]
        lines.append("| " + " | ".join([r["method"], seeds] + cells) + " |")
    caption = ("Percent, mean ± sample std over training seeds, on the validation people (held-out train "
               "people, the validate stage). val rank-1 <p>: gallery rank-1, probes masked with probability p. "
               "val u-u / m-u / m-m: verification accuracy unmasked / one side masked / both masked.")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", help="output of `dvc exp show --json` ('-' = stdin); "
                                            "default: run it here")
    ap.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                    help="comma-separated flattened metric keys")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                    help="a param older runs lack, with the value they ran with (YAML value; repeatable)")
    ap.add_argument("--min-seeds", type=int, default=1, metavar="N",
                    help="leave out methods with fewer than N seeds (single exploratory runs)")
    args = ap.parse_args(argv)
    assume = {}
    for item in args.assume:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --assume {item!r}: expected KEY=VALUE, e.g. train.arcface.init=auto", file=sys.stderr)
            return 2
        assume[key] = yaml.safe_load(value)
    if args.json == "-":
        text = sys.stdin.read()
    elif args.json:
        text = Path(args.json).read_text()
    else:
        p = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True,
                           text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return p.returncode
        text = p.stdout
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    rows = build_table(json.loads(text), columns, assume, args.min_seeds)
    if not rows:
        print(f"error: no experiment with {METRICS_FILE} found", file=sys.stderr)
        return 1
    table = to_markdown(rows, columns) + comparison_markdown(compare(rows, columns), columns)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
