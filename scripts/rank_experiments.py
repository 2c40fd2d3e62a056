"""Rank DVC experiments by their validation figures alone: validation/metrics.json, never eval/.

The sweep view of `dvc exp show`: each experiment (and committed baseline) with the params that
differ between them, its validation figures with 95% intervals (held-out train people, the
validate stage), and its paired difference to dlib on masked-unmasked accuracy; best validation
masked-unmasked accuracy first. A sweep runs up to the validate stage only, so no test figure is
even computed for it:

    dvc exp run --queue validate -S train.distill.raw_weight=1,2,4    # then: dvc queue start
    python scripts/rank_experiments.py            # runs `dvc exp show --json` itself
    dvc exp show --json | python scripts/rank_experiments.py -
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from table1 import experiments  # scripts/, beside this file

VALIDATION = "validation/metrics.json"
# column title -> flattened key in validation/metrics.json (its interval: <key>_ci.low/high, or the
# gallery's rank1_ci.<portion>.low/high)
COLUMNS = {"val u-u": "verification.unmasked_unmasked.accuracy",
           "val m-u": "verification.masked_unmasked.accuracy",
           "val m-m": "verification.masked_masked.accuracy",
           "val rank-1 0": "gallery.rank1.mask_0",
           "val rank-1 1.0": "gallery.rank1.mask_1.0"}
SORT = COLUMNS["val m-u"]


def _ci_key(key: str) -> str:
    section, name, last = key.split(".", 2)
    return f"{section}.{name}.{last}_ci" if section == "verification" else f"{section}.{name}_ci.{last}"


def cell(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    if not isinstance(v, (int, float)):
        return "-"
    lo, hi = metrics.get(f"{_ci_key(key)}.low"), metrics.get(f"{_ci_key(key)}.high")
    return f"{100 * v:.1f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else "")


def ranked(exp_show: list) -> tuple[list[dict], list[str]]:
    """The experiments with validation figures, best first, and the params that differ among them."""
    records = [r for r in experiments(exp_show, VALIDATION) if isinstance(r["metrics"].get(SORT), (int, float))]
    keys = sorted({k for r in records for k in r["params"]})
    differ = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in records}) > 1]
    return sorted(records, key=lambda r: -r["metrics"][SORT]), differ


def to_markdown(records: list[dict], differ: list[str]) -> str:
    head = ["experiment", *differ, *COLUMNS, "m-u vs dlib [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        d = "vs_dlib.verification.masked_unmasked.accuracy"
        vs = (f"{100 * m[d + '.diff']:+.1f} [{100 * m[d + '.low']:+.1f}, {100 * m[d + '.high']:+.1f}]"
              if f"{d}.diff" in m else "-")
        lines.append("| " + " | ".join([r["name"], *(str(r["params"].get(k, "-")) for k in differ),
                                        *(cell(m, k) for k in COLUMNS.values()), vs]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", help="output of `dvc exp show --json` ('-' = stdin); default: run it here")
    args = ap.parse_args(argv)
    if args.json == "-":
        text = sys.stdin.read()
    elif args.json:
        text = Path(args.json).read_text()
    else:
        p = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return p.returncode
        text = p.stdout
    records, differ = ranked(json.loads(text))
    if not records:
        print(f"error: no experiment with {VALIDATION} found", file=sys.stderr)
        return 1
    print(to_markdown(records, differ), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
