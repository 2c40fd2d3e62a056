"""scripts/rank_experiments.py on a real `dvc exp show` over real `dvc exp run validate`s: experiments
ranked by validation figures alone, test figures never read (a sweep does not even compute them)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from tests.dvc_project import dvc, init_repo

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import rank_experiments  # noqa: E402

# validate: m-u accuracy peaks at raw_weight 2; evaluate (test) would say otherwise, with a sentinel
VALIDATE = """import json, os, yaml
w = yaml.safe_load(open("params.yaml"))["train"]["raw_weight"]
acc = 0.9 - 0.01 * (w - 2) ** 2 + 0.001 * w
os.makedirs("validation", exist_ok=True)
v = {"masked_unmasked": {"accuracy": acc, "accuracy_ci": {"low": acc - 0.02, "high": acc + 0.02}},
     "unmasked_unmasked": {"accuracy": 0.98}, "masked_masked": {"accuracy": acc}}
vs = {"verification": {"masked_unmasked": {"accuracy": {"diff": acc - 0.85, "low": acc - 0.87,
                                                         "high": acc - 0.83, "verdict": 1}}}}
json.dump({"verification": v, "gallery": {"rank1": {"mask_0": 0.93, "mask_1.0": 0.6},
           "rank1_ci": {"mask_0": {"low": 0.9, "high": 0.95}}}, "vs_dlib": vs}, open("validation/metrics.json", "w"))
"""
EVALUATE = """import json, os
os.makedirs("eval", exist_ok=True)
json.dump({"verification": {"masked_unmasked": {"accuracy": 0.123456}}}, open("eval/metrics.json", "w"))
"""
DVC_YAML = """stages:
  validate:
    cmd: python validate.py
    deps: [validate.py]
    params: [train]
    metrics:
      - validation/metrics.json:
          cache: false
  evaluate:
    cmd: python evaluate.py
    deps: [evaluate.py, validation/metrics.json]
    metrics:
      - eval/metrics.json:
          cache: false
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = init_repo(tmp_path_factory.mktemp("sweep"), {"params.yaml": "train:\n  raw_weight: 4\n  seed: 0\n",
                                                        "validate.py": VALIDATE, "evaluate.py": EVALUATE,
                                                        "dvc.yaml": DVC_YAML})
    for w in (1, 2, 3):  # the sweep: up to validate only
        dvc("exp", "run", "-q", "validate", "-S", f"train.raw_weight={w}", cwd=repo)
    return repo


def test_experiments_rank_by_validation_and_test_is_never_read(repo):
    p = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "rank_experiments.py")], cwd=repo,
                       capture_output=True, text=True, check=True)
    lines = p.stdout.splitlines()
    assert lines[0] == ("| experiment | train.raw_weight | val u-u | val m-u | val m-m | val rank-1 0 | val rank-1 1.0 "
                        "| m-u vs dlib [95% CI] |")
    weights = [line.split(" | ")[1] for line in lines[2:]]
    assert weights == ["2", "3", "1"]  # 90.2, 89.3, 89.1
    assert lines[2].split(" | ")[3] == "90.2 [88.2, 92.2]" and lines[2].split(" | ")[5] == "93.0 [90.0, 95.0]"
    assert lines[2].endswith("| +5.2 [+3.2, +7.2] |")
    assert "12.3" not in p.stdout  # the evaluate sentinel
    data = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    exps = [rev for base in data for e in base.get("experiments") or [] for rev in e.get("revs") or []]
    # the sweep computed no test figure: eval/metrics.json does not exist in any experiment
    assert exps and all("data" not in rev["data"]["metrics"].get("eval/metrics.json", {}) for rev in exps)


def test_no_validation_figures_is_a_clear_error(tmp_path):
    (tmp_path / "exps.json").write_text("[]")
    assert rank_experiments.main([str(tmp_path / "exps.json")]) == 1
