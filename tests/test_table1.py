"""scripts/table1.py on the JSON of a real `dvc exp show` over real `dvc exp run`s.

The experiments run a two-line stage that writes validation/metrics.json from the params, so the right
table is known in advance; the real pipeline's experiment queue is tested in test_pipeline_dvc.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from tests.dvc_project import dvc, init_repo

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import table1  # noqa: E402

STAGE = """import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
b, s = p["train"]["distill"]["beta"], p["train"]["seed"]
os.makedirs("validation", exist_ok=True)
r = {"mask_0": 0.80 + 0.01 * s, "mask_0.5": 0.60 + 0.1 * b + 0.02 * s, "mask_1.0": 0.40 + 0.2 * b}
ref = {"gallery": {"rank1": {"mask_0": 0.9, "mask_0.5": 0.7, "mask_1.0": 0.5}}}
json.dump({"gallery": {"rank1": r}, "reference": {"dlib": ref}}, open("validation/metrics.json", "w"))
"""


@pytest.fixture(scope="module")
def exp_show(tmp_path_factory):
    repo = init_repo(tmp_path_factory.mktemp("exps"), {
        "params.yaml": "train:\n  seed: 0\n  distill:\n    kind: cosine\n    beta: 1.0\n", "stage.py": STAGE,
        "dvc.yaml": "stages:\n  evaluate:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                    "    params: [train]\n    metrics:\n      - validation/metrics.json:\n          cache: false\n"})
    for beta in (0, 1):
        for seed in (0, 1, 2):
            dvc("exp", "run", "-q", "-S", f"train.distill.beta={beta}", "-S", f"train.seed={seed}", cwd=repo)
    return json.loads(dvc("exp", "show", "--json", cwd=repo).stdout), repo


def test_table_groups_seeds_and_reports_mean_and_sample_std(exp_show):
    data, _ = exp_show
    rows = table1.build_table(data)
    assert [r["method"] for r in rows] == ["from scratch: ArcFace",
                                           "from scratch: ArcFace + self distillation (cosine, beta=1)",
                                           "dlib ResNet (pretrained, mask-unaware reference)"]
    arc, dist, ref = rows
    assert arc["seeds"] == dist["seeds"] == 3 and arc["seed_values"] == [0, 1, 2]
    # ArcFace mask_0: 0.80, 0.81, 0.82 -> 81.0 +- 1.0 (sample std); mask_0.5: 60, 62, 64 -> 62.0 +- 2.0
    assert table1.cell(arc["gallery.rank1.mask_0"]) == "81.0 ± 1.0"
    assert table1.cell(arc["gallery.rank1.mask_0.5"]) == "62.0 ± 2.0"
    assert table1.cell(dist["gallery.rank1.mask_0.5"]) == "72.0 ± 2.0"
    assert table1.cell(dist["gallery.rank1.mask_1.0"]) == "60.0 ± 0.0"
    assert table1.cell(ref["gallery.rank1.mask_1.0"]) == "50.0"


def test_script_prints_markdown_from_dvc_itself(exp_show):
    _, repo = exp_show
    p = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "table1.py")], cwd=repo,
                       capture_output=True, text=True, check=True)
    lines = p.stdout.splitlines()
    assert ("| method | seeds | val rank-1 mask_0 | val rank-1 mask_0.5 | val rank-1 mask_1.0 | val u-u | val m-u "
            "| val m-m |") in lines
    assert "| from scratch: ArcFace | 3 | 81.0 ± 1.0 | 62.0 ± 2.0 | 40.0 ± 0.0 | - | - | - |" in lines
    # the verdict: distillation vs none, difference of means against 2 sample std
    assert ("| from scratch: ArcFace + self distillation (cosine, beta=1) | +0.0 (<= 2.0) | +10.0 (> 4.0) "
            "| +20.0 (> 0.0) | - | - | - |") in lines


def test_distillation_beats_none_only_by_more_than_two_std(exp_show):
    data, _ = exp_show
    cols = ("gallery.rank1.mask_0", "gallery.rank1.mask_0.5", "gallery.rank1.mask_1.0")
    [cmp] = table1.compare(table1.build_table(data, cols), cols)
    assert cmp["against"] == "from scratch: ArcFace"
    assert cmp["columns"]["gallery.rank1.mask_0"] == {"diff": 0.0, "two_std": 2.0, "beats": False}
    assert cmp["columns"]["gallery.rank1.mask_0.5"] == {"diff": 10.0, "two_std": 4.0, "beats": True}


def test_runs_differing_in_other_params_are_not_averaged():
    def rec(rev, beta, seed, epochs, v):
        params = {"train": {"seed": seed, "epochs": epochs, "distill": {"kind": "mse", "beta": beta}}}
        return {"rev": rev, "name": rev, "error": None, "experiments": None,
                "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                         "metrics": {"validation/metrics.json": {"data": {"gallery": {"rank1": {"mask_0": v}}}}}}}
    # b's beta 1.0 is a's 1 (`-S train.distill.beta=1` against params.yaml's 1.0): one group
    data = [rec("a", 1, 0, 1, 0.5), rec("b", 1.0, 1, 1, 0.7), rec("c", 1, 0, 5, 0.9)]
    rows = table1.build_table(data, ("gallery.rank1.mask_0",))
    assert sorted((r["method"], r["seeds"]) for r in rows) == [
        ("from scratch: ArcFace + self distillation (mse, beta=1) [train.epochs=1]", 2),
        ("from scratch: ArcFace + self distillation (mse, beta=1) [train.epochs=5]", 1)]
    # --min-seeds 2: the single exploratory run is left out (the dlib row needs no seeds)
    rows = table1.build_table(data, ("gallery.rank1.mask_0",), min_seeds=2)
    assert [(r["method"], r["seeds"]) for r in rows] == [("from scratch: ArcFace + self distillation (mse, beta=1)", 2)]


def test_a_seed_without_a_metric_is_counted_and_a_differing_reference_is_shown(capsys):
    def rec(rev, seed, metrics):
        params = {"train": {"seed": seed, "distill": {"kind": "mse", "beta": 1}}}
        return {"rev": rev, "name": rev, "error": None, "experiments": None,
                "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                         "metrics": {"validation/metrics.json": {"data": metrics}}}}
    cols = ("a", "b")
    data = [rec("r0", 0, {"a": 0.5, "b": 0.6, "reference": {"dlib": {"a": 0.4}}}),
            rec("r1", 1, {"a": 0.7, "reference": {"dlib": {"a": 0.6}}})]
    rows = table1.build_table(data, cols)
    assert "differs between runs for a: [0.4, 0.6]" in capsys.readouterr().err
    md = table1.to_markdown(rows, cols)
    assert "| 2 | 60.0 ± 14.1 | 60.0 (1 of 2 seeds) |" in md  # not the 1-seed figure passed off as 2
    assert "| dlib ResNet (pretrained, mask-unaware reference) | - | 50.0 ± 14.1 | - |" in md  # not the minimum


def test_fine_tuning_rows_name_their_start_and_teacher():
    label = table1.method_label({"train.pretrained": "dlib", "train.arcface.weight": 0.0,
                                 "train.distill.kind": "cosine", "train.distill.beta": 1.0,
                                 "train.distill.teacher": "frozen", "train.distill.raw_weight": 2.0})
    assert label == "dlib fine-tuned: frozen teacher (cosine, beta=1, raw=2)"
    assert table1.method_label({"train.pretrained": "dlib", "train.arcface.weight": 1.0, "train.distill.kind": "cosine",
                                "train.distill.beta": 1.0, "train.distill.teacher": "frozen",
                                "train.distill.raw_weight": 4.0}) == \
        "dlib fine-tuned: ArcFace + frozen teacher (cosine, beta=1, raw=4)"
    assert table1.method_label({"train.pretrained": "dlib", "train.arcface.weight": 1.0, "train.distill.kind": "cosine",
                                "train.distill.beta": 1.0, "train.distill.teacher": "frozen",
                                "train.distill.raw_weight": 4.0, "train.wise_alpha": 0.7}) == \
        "dlib fine-tuned: ArcFace + frozen teacher (cosine, beta=1, raw=4), WiSE-FT alpha=0.7"
    assert table1.method_label({"train.pretrained": "dlib", "train.distill.kind": "none"}) == \
        "dlib fine-tuned: ArcFace"


def test_a_run_listed_at_two_commits_counts_once_and_older_runs_take_assumed_params(capsys):
    def rec(rev, params, v):
        return {"rev": rev, "name": rev, "error": None, "experiments": None,
                "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                         "metrics": {"validation/metrics.json": {"data": {"gallery": {"rank1": {"mask_0": v}}}}}}}
    new = {"train": {"seed": 0, "distill": {"kind": "none"}, "arcface": {"init": "auto"}}}
    old = {"train": {"seed": 1, "distill": {"kind": "none"}}}  # before arcface.init existed
    data = [rec("head", new, 0.5), rec("base", new, 0.5), rec("s1", old, 0.7)]
    cols = ("gallery.rank1.mask_0",)
    # without --assume the old run is a group of its own; the seed-0 run shown twice counts once
    rows = table1.build_table(data, cols)
    assert sorted(r["seeds"] for r in rows) == [1, 1]
    assert "base repeats head's params and seed (same metrics); counted once" in capsys.readouterr().err
    [row] = table1.build_table(data, cols, assume={"train.arcface.init": "auto"})
    assert row["seeds"] == 2 and row["seed_values"] == [0, 1] and table1.cell(row[cols[0]]) == "60.0 ± 14.1"
