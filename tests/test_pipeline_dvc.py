"""Real `dvc repro` runs of this project's dvc.yaml on a tiny LFW subset."""
from __future__ import annotations

import shutil

import pytest

from tests.dvc_project import dvc, lock_hashes, make_project


@pytest.mark.slow
def test_ingest_reproducible_and_cached(tmp_path, lfw_small):
    project = make_project(tmp_path / "proj", lfw_small, {"ingest": {"chunk_size": 20}})
    dvc("repro", "ingest", cwd=project)
    first = lock_hashes(project)["ingest"]
    assert first["data/ingest"].endswith(".dir")
    again = dvc("repro", "ingest", cwd=project).stdout
    assert "didn't change" in again and "Running stage" not in again
    # a clean second run from nothing gives byte-identical outputs: the same dvc.lock hash
    shutil.rmtree(project / "data" / "ingest")
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
    (project / "dvc.lock").unlink()
    out = dvc("repro", "ingest", cwd=project).stdout
    assert "Running stage 'ingest'" in out
    assert lock_hashes(project)["ingest"] == first
    # a params change that matters reruns the stage and changes the output
    params = (project / "params.yaml").read_text().replace("chunk_size: 20", "chunk_size: 7")
    (project / "params.yaml").write_text(params)
    status = dvc("status", "ingest", cwd=project).stdout
    assert "params.yaml" in status and "modified:" in status and "ingest" in status


# ---------------------------------------------------------------- the whole pipeline, tiny and real
TINY_PARAMS = {
    "compute": {"n_jobs": 1},
    "ingest": {"chunk_size": 20},
    "pack": {"shard_max_count": 4, "val_fraction": 0.34},
    "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "val_every": 0,
              "warmup_steps": 1, "log_every": 1, "shuffle_buffer": 8, "embedding_dim": 64},
    "evaluate": {"batch_size": 16},
}
STAGES = {"ingest", "mask", "align", "pack", "train", "embed_reference", "evaluate"}


def _ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def _commit(project, message: str) -> None:
    from tests.dvc_project import run

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message, "--allow-empty"], project)


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    from tests.conftest import make_lfw_subset, write_eval_pairs

    root = tmp_path_factory.mktemp("pipeline")
    subset = make_lfw_subset(root / "lfw", 6, 4)
    write_eval_pairs(subset)
    project = make_project(root / "A", subset, TINY_PARAMS)
    out = dvc("repro", cwd=project).stdout
    assert _ran(out) == STAGES, out
    _commit(project, "tiny experiment")
    return project


@pytest.mark.slow
def test_whole_pipeline_runs_once_then_nothing(tiny_project):
    import json

    again = dvc("repro", cwd=tiny_project).stdout
    assert _ran(again) == set() and "Data and pipelines are up to date" in again
    assert "up to date" in dvc("status", cwd=tiny_project).stdout
    metrics = json.loads((tiny_project / "eval" / "metrics.json").read_text())
    assert {"mask_0", "mask_0.5", "mask_1.0"} <= set(metrics["gallery"]["rank1"])
    shown = dvc("metrics", "show", "--json", cwd=tiny_project).stdout
    assert "gallery" in shown and "verification" in shown
    plots = dvc("plots", "show", "--json", cwd=tiny_project).stdout
    assert "contact_sheet.png" in plots and "roc" in plots


@pytest.mark.slow
def test_teammate_pulls_the_cache_and_recomputes_nothing(tiny_project, tmp_path):
    from tests.dvc_project import run

    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=tiny_project)
    dvc("push", cwd=tiny_project)
    _commit(tiny_project, "remote")
    clone = tmp_path / "B"
    run(["git", "clone", "-q", str(tiny_project), str(clone)], tmp_path)
    (clone / "data" / "sources").mkdir(parents=True)
    (clone / "data" / "sources" / "lfw").symlink_to((tiny_project / "data" / "sources" / "lfw").resolve())
    dvc("pull", cwd=clone)
    assert "up to date" in dvc("status", cwd=clone).stdout
    out = dvc("repro", cwd=clone).stdout
    assert _ran(out) == set(), out
    for path in ("data/shards/index.json", "models/model.pt", "data/aligned/summary.json"):
        assert (clone / path).read_bytes() == (tiny_project / path).read_bytes()


@pytest.mark.slow
def test_changing_beta_reruns_only_train_and_evaluate(tiny_project):
    params = tiny_project / "params.yaml"
    before = params.read_text()
    params.write_text(before.replace("beta: 1.0", "beta: 0.5", 1))
    assert before != params.read_text()
    status = dvc("status", cwd=tiny_project).stdout
    changed = {line.rstrip(":").strip() for line in status.splitlines()
               if line and not line.startswith(("\t", " "))}
    # dvc status names the stages whose own deps changed: train; evaluate's input (the model) changes
    # only once train has run, and nothing upstream is touched
    assert changed == {"train"}, status
    out = dvc("repro", cwd=tiny_project).stdout
    assert _ran(out) == {"train", "evaluate"}, out
    params.write_text(before)
    dvc("repro", cwd=tiny_project)  # back to the committed experiment (train reruns fresh)
    _commit(tiny_project, "back to beta 1.0")


@pytest.mark.slow
def test_changing_shard_size_reruns_pack_and_below_not_mask_or_align(tiny_project):
    """Issue 4: a new pack.shard_max_bytes re-cuts the shards (pack) and retrains on them; the
    expensive image stages upstream (mask, align) and the dlib reference stay cached."""
    import json

    params = tiny_project / "params.yaml"
    before = params.read_text()
    before_index = json.loads((tiny_project / "data" / "shards" / "index.json").read_text())
    one_pair = max(s["bytes"] / s["samples"] for s in before_index["train"]["shards"])
    smaller = int(one_pair * 2.5)  # about two pairs per shard instead of four
    params.write_text(before.replace("shard_max_bytes: 16000000", f"shard_max_bytes: {smaller}", 1))
    assert before != params.read_text()
    out = dvc("repro", cwd=tiny_project).stdout
    ran = _ran(out)
    assert "pack" in ran and not ran & {"ingest", "mask", "align", "embed_reference"}, out
    assert ran == {"pack", "train", "evaluate"}, out
    index = json.loads((tiny_project / "data" / "shards" / "index.json").read_text())
    assert len(index["train"]["shards"]) > len(before_index["train"]["shards"])
    assert all(s["bytes"] <= smaller for s in index["train"]["shards"] if s["samples"] > 1)
    assert index["train"]["samples"] == before_index["train"]["samples"]  # same pairs, cut finer
    params.write_text(before)
    dvc("repro", cwd=tiny_project)
    _commit(tiny_project, "back to the default shard size")


@pytest.mark.slow
def test_queued_experiments_and_table(tiny_project):
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT_ROOT

    for beta in ("0", "2"):
        dvc("exp", "run", "--queue", "-S", f"train.distill.beta={beta}", "-C", "data/sources/lfw",
            cwd=tiny_project)
    dvc("queue", "start", "-j", "1", cwd=tiny_project)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=tiny_project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status + dvc("queue", "logs", "-e", "latest", cwd=tiny_project, check=False).stdout
    dvc("queue", "stop", "--kill", cwd=tiny_project, check=False)
    shown = json.loads(dvc("exp", "show", "--json", cwd=tiny_project).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    betas = set()
    for e in exps:
        for r in e.get("revs", []):
            data = r.get("data") or {}
            beta = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {}) \
                .get("distill", {}).get("beta")
            if data.get("metrics", {}).get("eval/metrics.json"):
                betas.add(beta)
    assert {0, 2} <= betas, json.dumps(shown)[:3000]
    table = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "table1.py")], cwd=tiny_project,
                           capture_output=True, text=True, check=True).stdout
    assert "| method | seeds |" in table and "distill" in table


@pytest.mark.slow
def test_code_change_retrains_from_scratch(tiny_project):
    """A changed train dependency (the ArcFace init) must train anew, never "resume" the finished
    run's checkpoint and keep the old model under the new code's hash (issue: stale model)."""
    losses = tiny_project / "pipeline" / "losses.py"
    source = losses.read_text()
    before = lock_hashes(tiny_project)["train"]["models"]
    assert not (tiny_project / "checkpoints" / "train").exists()  # a finished run leaves no resume state
    losses.write_text(source.replace("nn.init.normal_(self.weight, std=0.01)", "nn.init.normal_(self.weight, std=0.02)"))
    try:
        out = dvc("repro", "train", cwd=tiny_project).stdout
        assert "Running stage 'train'" in out and "resuming" not in out, out
        assert lock_hashes(tiny_project)["train"]["models"] != before
    finally:
        losses.write_text(source)
        dvc("repro", "train", cwd=tiny_project)  # the old code's model, from DVC's run cache
    assert lock_hashes(tiny_project)["train"]["models"] == before
