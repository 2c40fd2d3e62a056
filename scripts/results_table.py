"""README's results table from an evaluate stage's metrics.json (the TEST figures of the one chosen
recipe, scored once: not a tool for sweeps, which rank on validation columns): every headline figure of the model
and of dlib with its 95% interval (bootstrap over identities), and the paired difference with its
interval and verdict: "better" / "worse" only where the interval excludes 0, else "within noise".

  python scripts/results_table.py eval/metrics.json
  python scripts/results_table.py --headline --readme README.md   # README's table, between its markers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate.evaluation import figure_at as _get  # noqa: E402

VERDICT = {1: "better", -1: "worse", 0: "within noise"}
CONDITIONS = {"unmasked_unmasked": "u-u", "masked_unmasked": "m-u", "masked_masked": "m-m"}
VIEWS = {"verification": "View 1 DevTest", "verification_view2": "View 2",
         "verification_view2_unseen": "View 2 unseen people"}
GAP_VERDICT = {1: "larger gap", -1: "smaller gap", 0: "within noise"}  # for a gap, lower is better
BY_MASK = {"verification_masked_unmasked": "View 1 m-u accuracy", "gallery_rank1_mask_1.0": "rank-1, all probes masked"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _with_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{_pct(value)} [{_pct(ci['low'])}, {_pct(ci['high'])}]" if ci else _pct(value)


def figure_rows(m: dict) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(title, path of the figure, path of its interval) for every headline figure present."""
    rows = []
    for p in m["gallery"]["rank1"]:
        rows.append((f"gallery rank-1, probes {p.replace('_', ' ')}", ("gallery", "rank1", p),
                     ("gallery", "rank1_ci", p)))
    for view, title in VIEWS.items():
        if view not in m or m[view].get("skipped"):
            continue
        for cond, short in CONDITIONS.items():
            for fig in ("accuracy", "tar_at_far_1e-2", "tar_at_far_1e-3"):
                if fig in m[view][cond] and (fig == "accuracy" or m[view][cond][fig] is not None):
                    name = "accuracy" if fig == "accuracy" else fig.replace("tar_at_far_", "TAR @ FAR ")
                    rows.append((f"{title} {short} {name}", (view, cond, fig), (view, cond, f"{fig}_ci")))
    for fig in sorted(k for k in m.get("open_set", {}) if k.startswith("dir_at_fpir_") and not k.endswith("_ci")):
        for p, v in m["open_set"][fig].items():
            if v is not None:
                rows.append((f"open set DIR @ FPIR {fig.removeprefix('dir_at_fpir_')}, {p.replace('_', ' ')}",
                             ("open_set", fig, p), ("open_set", f"{fig}_ci", p)))
    for sec, title in BY_MASK.items():
        b = m.get("by_mask", {}).get(sec)
        if not b:
            continue
        unseen = "/".join(m["by_mask"]["unseen_types"]) or "none"
        for group, name in (("seen", "mask types seen in training"), ("unseen", f"unseen types ({unseen})"),
                            ("seen_minus_unseen", "seen - unseen")):
            if b.get(group) is not None:
                rows.append((f"{title}, {name}", ("by_mask", sec, group), ("by_mask", sec, f"{group}_ci")))
        for kind in ("type", "coverage"):
            for k, v in b[kind].items():
                if not k.endswith("_ci") and v is not None:
                    label = f"type {k}" if kind == "type" else f"face coverage {k.replace('_', ' ')}"
                    rows.append((f"{title}, {label}", ("by_mask", sec, kind, k), ("by_mask", sec, kind, f"{k}_ci")))
    return rows


def unreachable(m: dict) -> list[str]:
    """Operating points left out because the set cannot reach them."""
    out = []
    for view, title in VIEWS.items():
        if view in m and not m[view].get("skipped"):
            v = m[view]["masked_unmasked"]
            none = [k.replace("tar_at_far_", "") for k, x in v.items() if k.startswith("tar_at_far_")
                    and not k.endswith("_ci") and x is None]
            if none:
                out.append(f"{title}: TAR @ FAR {', '.join(none)} not reported ({v['pairs_different']} impostor "
                           f"pairs reach FAR >= {v['far_min_reachable']:.2g})")
    return out


HEADLINE = ("gallery", *VIEWS)  # README's table: rank-1 and verification; the rest in docs/experiments.md
README_START = "<!-- made by: python scripts/results_table.py --headline --readme README.md -->"
README_END = "<!-- end of the generated table -->"


def table(m: dict, headline: bool = False) -> str:
    ref = m.get("reference", {}).get("dlib")
    lines = ["| figure (percent) | model [95% CI] | dlib [95% CI] | model - dlib [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    rows = [r for r in figure_rows(m) if not headline or r[1][0] in HEADLINE]
    for title, path, ci_path in rows:
        d = _get(m.get("vs_dlib", {}), path)
        diff = f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else "n/a"
        lines.append(f"| {title} | {_with_ci(_get(m, path), _get(m, ci_path))} | "
                     f"{_with_ci(_get(ref, path), _get(ref, ci_path)) if ref else 'n/a'} | {diff} | "
                     f"{(GAP_VERDICT if path[-1] == 'seen_minus_unseen' else VERDICT)[d['verdict']] if d else 'n/a'} |")
    notes = unreachable(m)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def readme_with_table(readme: str, generated: str) -> str:
    """``readme`` with the text between its two markers replaced by ``generated``."""
    if readme.count(README_START) != 1 or readme.count(README_END) != 1:
        raise SystemExit(f"the README needs one line {README_START!r} and one {README_END!r}")
    head, rest = readme.split(README_START)
    return f"{head}{README_START}\n{generated}{README_END}{rest.split(README_END)[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="?", default="eval/metrics.json")
    ap.add_argument("--headline", action="store_true", help="rank-1 and verification rows only (README)")
    ap.add_argument("--readme", help="write the table into this file, between its markers")
    args = ap.parse_args()
    out = table(json.loads(Path(args.metrics).read_text()), headline=args.headline)
    if args.readme:
        Path(args.readme).write_text(readme_with_table(Path(args.readme).read_text(), out))
    else:
        print(out, end="")


if __name__ == "__main__":
    main()
