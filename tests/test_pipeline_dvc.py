"""Real `dvc repro` runs of this project's dvc.yaml on a tiny LFW subset."""
from __future__ import annotations

import re
import shutil

import pytest

from tests.dvc_project import dvc, lock_hashes, make_project


@pytest.mark.slow
def test_ingest_reproducible_and_cached(tmp_path, lfw_small):
    project = make_project(tmp_path / "proj", lfw_small, {"ingest": {"chunk_size": 20}})
    dvc("repro", "ingest@lfw", cwd=project)
    first = lock_hashes(project)["ingest@lfw"]
    assert first["data/lfw/ingest"].endswith(".dir")
    again = dvc("repro", "ingest@lfw", cwd=project).stdout
    assert "didn't change" in again and "Running stage" not in again
    # a clean second run from nothing gives byte-identical outputs: the same dvc.lock hash
    shutil.rmtree(project / "data" / "lfw" / "ingest")
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
    (project / "dvc.lock").unlink()
    out = dvc("repro", "ingest@lfw", cwd=project).stdout
    assert "Running stage 'ingest@lfw'" in out
    assert lock_hashes(project)["ingest@lfw"] == first
    # a params change that matters reruns the stage and changes the output
    params = (project / "params.yaml").read_text().replace("chunk_size: 20", "chunk_size: 7")
    (project / "params.yaml").write_text(params)
    status = dvc("status", "ingest@lfw", cwd=project).stdout
    assert "params.yaml" in status and "modified:" in status and "ingest" in status


@pytest.mark.slow
def test_ingest_reads_what_dvc_hashes_behind_links(tmp_path, lfw_small):
    """Issue 22: ingest followed folder links out of the source, which DVC does not hash, so files
    changed or added there left `dvc status` clean over a stale output. Now a folder link is a row
    with its reason and never read; file links (a `cp -rs` subset) are read, and DVC hashes their
    targets: a changed target reruns ingest."""
    import pyarrow.parquet as pq

    people = sorted((lfw_small / "lfw-deepfunneled").iterdir())[:3]
    elsewhere = tmp_path / "elsewhere"
    for person in people:
        shutil.copytree(person, elsewhere / person.name)
    source = tmp_path / "linked"
    (source / "A").mkdir(parents=True)
    for f in sorted((elsewhere / people[0].name).iterdir()):
        (source / "A" / f.name).symlink_to(f)
    (source / "B").symlink_to(elsewhere / people[1].name, target_is_directory=True)
    project = make_project(tmp_path / "proj", lfw_small, {
        "datasets": {"linked": {"source": "imagefolder", "path": str(source), "assume_aligned": False}}})

    def rows() -> dict[str, dict]:
        table = pq.read_table(project / "data" / "linked" / "ingest" / "manifest.parquet")
        return {r["source_path"]: r for r in table.to_pylist()}

    assert "Running stage 'ingest@linked'" in dvc("repro", "ingest@linked", cwd=project).stdout
    first = rows()
    assert first["B"]["status"] == "rejected" and "points out of the source" in first["B"]["reason"]
    assert {p for p, r in first.items() if r["status"] == "accepted"} == {f"A/{f.name}" for f in (source / "A").iterdir()}
    # behind the folder link: not read, so nothing is stale
    shutil.copy(people[2] / sorted(p.name for p in people[2].iterdir())[0], elsewhere / people[1].name / "new.jpg")
    assert "up to date" in dvc("status", "ingest@linked", cwd=project).stdout
    # behind a file link: DVC sees it, ingest reruns and reads the new photo
    target = sorted((elsewhere / people[0].name).iterdir())[0]
    shutil.copy(sorted(people[2].iterdir())[0], target)
    status = dvc("status", "ingest@linked", cwd=project).stdout
    assert "ingest@linked" in status and "modified:" in status, status
    assert "Running stage 'ingest@linked'" in dvc("repro", "ingest@linked", cwd=project).stdout
    changed = [p for p, r in rows().items() if r["sha256"] != first[p]["sha256"]]
    assert changed == [f"A/{target.name}"]


# ---------------------------------------------------------------- the whole pipeline, tiny and real
TINY_PARAMS = {
    "compute": {"n_jobs": 1},
    "ingest": {"chunk_size": 20},
    "mask": {"type_weights": {"real": 1.0}},  # the four photos of data/sources/rmfd give two bank entries
    "pack": {"shard_max_count": 4, "val_fraction": 0.34},
    "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "val_every": 0,
              "warmup_steps": 1, "log_every": 1, "shuffle_buffer": 8},
    "evaluate": {"batch_size": 16, "bootstrap_replicates": 100},
    # an outside pair benchmark: the subset's own photos and View 1 test pairs, aligned standalone
    "pair_benchmarks": {"tiny": {"path": "data/sources/lfw/lfw-deepfunneled", "pairs": "data/sources/lfw/pairsDevTest.txt"}},
}
STAGES = {"mask_bank", "ingest@lfw", "mask@lfw", "align@lfw", "overlap", "pack", "train", "validate", "export",
          "eval_scope", "embed_reference", "evaluate", "pair_benchmark@tiny"}
MODEL_SIDE = {"train", "validate", "export", "evaluate", "pair_benchmark@tiny"}  # what a new model reruns
LFW_SIDE = {"mask_bank", "ingest@lfw", "mask@lfw", "align@lfw", "embed_reference"}


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _commit(project, message: str) -> None:
    from tests.dvc_project import run

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message, "--allow-empty"], project)


def _back_to_committed(project) -> None:
    """What a user does to drop a tried change: git restores params, code and dvc.lock, and
    `dvc checkout` brings the committed outputs back from the cache (nothing recomputes)."""
    from tests.dvc_project import run

    run(["git", "checkout", "--", "."], project)
    dvc("checkout", "--force", cwd=project)
    status = dvc("status", cwd=project).stdout
    assert "up to date" in status, status


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
    assert "gallery" in shown and "verification" in shown and "eval/benchmarks/tiny/metrics.json" in shown
    bench = json.loads((tiny_project / "eval" / "benchmarks" / "tiny" / "metrics.json").read_text())
    assert bench["pairs"] == bench["model"]["pairs_scored"] + bench["pairs_failed"] > 0
    assert "by_mask" in metrics and "identify_thresholds" in metrics
    # test probes wearing real masks from the bank are scored as a type of their own
    assert metrics["by_mask"]["verification_masked_unmasked"]["count"]["type_real"] > 0
    plots = dvc("plots", "show", "--json", cwd=tiny_project).stdout
    assert "data/mask_bank/contact_sheet.png" in plots and "roc" in plots


@pytest.mark.slow
def test_plots_render_offline_in_a_headless_browser(tiny_project, tmp_path):
    """`make plots`: every vega chart of `dvc plots show` drawn by Chromium with no network (each host
    name unresolvable); DVC's own page, which loads vega from a CDN, draws none of them there."""
    import subprocess
    import sys

    from tests.browser import drawn_vega_charts, rendered_dom
    from tests.conftest import PROJECT_ROOT

    template = tmp_path / "template.html"
    subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "plots_offline.py"), "--out", str(template)],
                   check=True, capture_output=True)
    drawn = {}
    for name, extra in (("offline", ["--html-template", str(template)]), ("cdn", [])):
        dvc("plots", "show", *extra, "-o", str(tmp_path / name), cwd=tiny_project)
        page = tmp_path / name / "index.html"
        sources = re.findall(r'<script src="([^"]+)"', page.read_text())
        assert sources and all(src.startswith("data:" if name == "offline" else "https://") for src in sources)
        drawn[name] = drawn_vega_charts(page, rendered_dom(page))
    # the validation curves, ROC and CMC per condition, the training curves (the PNGs are <img>s)
    assert len(drawn["offline"]) >= 10 and all(n > 0 for n in drawn["offline"].values()), drawn["offline"]
    assert drawn["cdn"].keys() == drawn["offline"].keys() and not any(drawn["cdn"].values()), drawn["cdn"]


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
    (clone / "data" / "sources" / "rmfd").symlink_to(tiny_project / "data" / "sources" / "rmfd")  # make data
    dvc("pull", cwd=clone)
    assert "up to date" in dvc("status", cwd=clone).stdout
    out = dvc("repro", cwd=clone).stdout
    assert _ran(out) == set(), out
    for path in ("data/shards/index.json", "models/model.pt", "models/model.onnx", "data/lfw/aligned/summary.json"):
        assert (clone / path).read_bytes() == (tiny_project / path).read_bytes()
    # the export stage's file, checked against the checkpoint on the run's own validation crops
    import json

    export = json.loads((tiny_project / "eval" / "export.json").read_text())
    assert export["check"]["crops"] >= 8 and export["check"]["min_cosine"] >= 0.9999


@pytest.mark.slow
def test_changing_beta_reruns_only_train_validate_and_evaluate(tiny_project):
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
    assert _ran(out) == MODEL_SIDE, out
    _back_to_committed(tiny_project)


@pytest.mark.slow
def test_two_ranks_train_inside_dvc_repro(tiny_project):
    """train.nproc_per_node 2: `dvc repro train` starts torchrun itself (two gloo ranks on CPU) and
    DVC records the model like any stage's. What a 2-rank run promises against the 1-rank run of
    the same global batch: the same recipe and steps over the same pairs (every pair of the epoch
    read once, by one rank: test_training's DDP test), not the same weights (a global batch is
    two per-rank halves from disjoint shards, so the pairs are grouped and ordered otherwise; the
    gap is measured in docs/pipeline.md); and the same bytes when the 2-rank run is repeated."""
    import torch

    params = tiny_project / "params.yaml"
    before = params.read_text()
    one_rank = torch.load(tiny_project / "models" / "model.pt", weights_only=True)
    curve = tiny_project / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"  # a row per step
    one_rank_steps = len(curve.read_text().splitlines()) - 1
    params.write_text(before.replace("nproc_per_node: 1", "nproc_per_node: 2", 1))
    assert before != params.read_text()
    out = dvc("repro", "train", cwd=tiny_project).stdout
    assert _ran(out) == {"train"}, out
    model = tiny_project / "models" / "model.pt"
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["meta"]["world_size"] == 2 and one_rank["meta"]["world_size"] == 1
    assert len(curve.read_text().splitlines()) - 1 == one_rank_steps >= 1
    assert "train" not in dvc("status", "train", cwd=tiny_project).stdout  # recorded in dvc.lock
    first = model.read_bytes()
    assert _ran(dvc("repro", "-f", "-s", "train", cwd=tiny_project).stdout) == {"train"}
    assert model.read_bytes() == first  # a 2-rank run is deterministic (gloo, fixed shards per rank)
    _back_to_committed(tiny_project)


@pytest.mark.slow
def test_changing_shard_size_reruns_pack_and_below_not_mask_or_align(tiny_project):
    """Issue 4: a new pack.shard_max_bytes re-cuts the shards (pack), and everything that reads them
    is then out of date; the expensive image stages upstream (mask, align) and the dlib reference
    stay cached. (That a new train input reruns validate and evaluate is the beta test's.)"""
    import json

    params = tiny_project / "params.yaml"
    before = params.read_text()
    before_index = json.loads((tiny_project / "data" / "shards" / "index.json").read_text())
    one_pair = max(s["bytes"] / s["samples"] for s in before_index["train"]["shards"])
    smaller = int(one_pair * 2.5)  # about two pairs per shard instead of four
    params.write_text(before.replace("shard_max_bytes: 16000000", f"shard_max_bytes: {smaller}", 1))
    assert before != params.read_text()
    out = dvc("repro", "pack", cwd=tiny_project).stdout
    ran = _ran(out)
    assert "pack" in ran and not ran & LFW_SIDE, out
    status = dvc("status", cwd=tiny_project).stdout
    assert "train:" in status and "data/shards" in status, status  # the re-cut shards: train is next
    assert not {"mask@lfw:", "align@lfw:", "embed_reference:"} & set(status.split()), status
    index = json.loads((tiny_project / "data" / "shards" / "index.json").read_text())
    assert len(index["train"]["shards"]) > len(before_index["train"]["shards"])
    assert all(s["bytes"] <= smaller for s in index["train"]["shards"] if s["samples"] > 1)
    assert index["train"]["samples"] == before_index["train"]["samples"]  # same pairs, cut finer
    _back_to_committed(tiny_project)


@pytest.mark.slow
def test_queued_experiments_and_table(tiny_project):
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT_ROOT

    # one queued experiment beside the committed baseline (beta 1), run up to validate as a sweep is
    # (scripts/rank_experiments.py): no test figure is computed for it
    dvc("exp", "run", "--queue", "validate", "-S", "train.distill.beta=2", "-C", "data/sources/lfw",
        "-C", "data/sources/rmfd", cwd=tiny_project)
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
    revs = [rev for rev in shown if rev.get("rev") != "workspace"]
    revs += [r for rev in shown for e in (rev.get("experiments") or []) for r in e.get("revs", [])]
    betas = set()
    for r in revs:
        data = r.get("data") or {}
        beta = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {}) \
            .get("distill", {}).get("beta")
        if data.get("metrics", {}).get("validation/metrics.json"):
            betas.add(beta)
    assert {1, 2} <= betas, json.dumps(shown)[:3000]
    table = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "table1.py")], cwd=tiny_project,
                           capture_output=True, text=True, check=True).stdout
    assert "| method | seeds |" in table and "dlib fine-tuned: ArcFace + frozen teacher (cosine, beta=2" in table


@pytest.mark.slow
def test_code_change_retrains_from_scratch(tiny_project):
    """A changed train dependency (the ArcFace init) must train anew, never "resume" the finished
    run's checkpoint and keep the old model under the new code's hash (issue: stale model)."""
    import json

    losses = tiny_project / "pipeline" / "train" / "losses.py"
    source = losses.read_text()
    before = lock_hashes(tiny_project)["train"]["models/model.pt"]
    assert not (tiny_project / "checkpoints" / "train").exists()  # a finished run leaves no resume state
    losses.write_text(source.replace("nn.init.normal_(self.weight, std=0.01)", "nn.init.normal_(self.weight, std=0.02)"))
    try:
        out = dvc("repro", "train", cwd=tiny_project).stdout
        assert "Running stage 'train'" in out and "resuming" not in out, out
        # the stale-model bug trained 0 steps; a fresh run trains every step of its epochs (model.pt
        # itself may be the untrained point when a tiny run never beats it on validation)
        summary = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"epochs"')))
        assert not summary["resumed"] and summary["steps"] >= 1, summary
    finally:
        _back_to_committed(tiny_project)
    assert lock_hashes(tiny_project)["train"]["models/model.pt"] == before


# ---------------------------------------------------------------- an external training set
EXTERNAL_IMAGES = {"sim_rec": 400, "sim_folder": 100}  # 500 simulated pre-aligned crops in all


@pytest.fixture(scope="module")
def external_project(tmp_path_factory, tiny_shards, tiny_project):
    """The report's protocol on a tiny scale: a simulated insightface .rec and an ImageFolder of
    pre-aligned crops as training sets, a tiny LFW as the evaluation set. It shares the first
    project's DVC cache, as teammates do: the same LFW subset ingested and masked with the same
    params comes from DVC's run cache, not run again (its align template differs, so align runs)."""
    import sys

    from tests.conftest import PROJECT_ROOT, make_lfw_subset, write_eval_pairs

    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from simulate_dataset import simulate, write

    root = tmp_path_factory.mktemp("external")
    aligned = tiny_shards.parent / "aligned"
    write(simulate(aligned, EXTERNAL_IMAGES["sim_rec"], 20, seed=0), root / "sim_rec", None, 20)
    write(simulate(aligned, EXTERNAL_IMAGES["sim_folder"], 20, seed=1), None, root / "sim_folder", 20)
    subset = make_lfw_subset(root / "lfw", 6, 4)
    write_eval_pairs(subset)
    params = {**TINY_PARAMS, "compute": {"n_jobs": 2}, "pair_benchmarks": {},
              # the simulated sets ARE LFW people (jittered LFW crops): the overlap check finds them
              # (asserted below) and keeps them, as these tests are about the DAG
              "overlap": {"action": "keep"},
              # the GPU recipe's network (ResNet18 from scratch, ArcFace + twin distillation, on
              # insightface's 112 template): these tests are about the DAG, and it is the cheaper one
              "align": {"template": "arcface112"},
              "train": {**TINY_PARAMS["train"], "batch_size": 32, "backbone": "resnet18", "pretrained": "none", "wise_alpha": 1.0,
                        "embedding_dim": 64, "arcface": {"weight": 1.0}, "distill": {"teacher": "self"}},
              "datasets": {"lfw": {"source": "lfw", "path": "data/sources/lfw", "assume_aligned": False},
                           "sim_rec": {"source": "recordio", "path": str(root / "sim_rec"), "assume_aligned": True},
                           "sim_folder": {"source": "imagefolder", "path": str(root / "sim_folder"),
                                          "assume_aligned": True}},
              "train_set": "sim_rec"}
    project = make_project(root / "E", subset, params)
    dvc("cache", "dir", str(tiny_project / ".dvc" / "cache"), cwd=project)
    out = dvc("repro", cwd=project).stdout
    restored = {"mask_bank", "ingest@lfw", "mask@lfw"}
    assert all(f"Stage '{s}' is cached - skipping run" in out for s in restored), out
    assert _ran(out) == STAGES - {"pair_benchmark@tiny"} - restored | {
        "ingest@sim_rec", "mask@sim_rec", "align@sim_rec", "ingest@sim_folder", "mask@sim_folder", "align@sim_folder"}, out
    _commit(project, "external training set")
    return project


def _metrics(project) -> dict:
    import json

    return json.loads((project / "eval" / "metrics.json").read_text())


@pytest.mark.slow
def test_external_recordio_set_trains_and_all_of_lfw_is_evaluated(external_project):
    import json

    m = _metrics(external_project)
    found = m["training_set"].pop("overlap_by_face")
    assert m["training_set"] == {"name": "sim_rec", "source": "recordio", "external": 1,
                                 "identity_names_checkable": 0}
    assert m["evaluation_set"] == "LFW, all images"
    # faces, not names: the .rec's numbered identities are jittered LFW people, and most are found
    assert found["checked"] == 1 and found["action"] == "keep" and found["matches"] >= found["train_identities"] // 2
    # every LFW identity with >= 2 images is enrolled: the subset's 6 train + 4 test people
    assert m["gallery"]["identities_enrolled"] == 10 and m["identities"] == 10
    v2 = m["verification_view2"]
    for cond in ("unmasked_unmasked", "masked_unmasked", "masked_masked"):
        assert 0.0 <= v2[cond]["accuracy"] <= 1.0 and "accuracy_std" in v2[cond]
    assert "skipped" not in v2 and m["reference"]["dlib"]["verification_view2"]["unmasked_unmasked"]["accuracy"] > 0.5
    # the crops went through untouched: pre-aligned route, masks from HOG or the canonical shape
    align = json.loads((external_project / "data" / "sim_rec" / "aligned" / "summary.json").read_text())
    assert align["routes"] == {"pre_aligned": EXTERNAL_IMAGES["sim_rec"]}
    mask = json.loads((external_project / "data" / "sim_rec" / "masked" / "summary.json").read_text())
    assert {k for k, v in mask["routes"].items() if v} <= {"hog", "canonical"} and mask["rejected"] == 0
    assert mask["routes"]["hog"] > mask["routes"]["canonical"]  # most crops get real landmarks
    index = json.loads((external_project / "data" / "shards" / "index.json").read_text())
    assert index["aligned"] == EXTERNAL_IMAGES["sim_rec"]


@pytest.mark.slow
def test_switching_the_training_set_reruns_no_lfw_side_stage(external_project):
    """The new set is packed, and from there only the model side is out of date: no LFW-side stage
    reruns (the scope file is rewritten with the same bytes, so the dlib reference stays cached).
    Training and evaluating on an external set is the test above's."""
    import json

    from pipeline.config import load_params
    from pipeline.evaluate.evaluation import training_set_info

    params = external_project / "params.yaml"
    before = params.read_text()
    params.write_text(before.replace("train_set: sim_rec", "train_set: sim_folder"))
    assert params.read_text() != before
    out = dvc("repro", "eval_scope", "pack", cwd=external_project).stdout
    ran = _ran(out)
    assert ran == {"eval_scope", "overlap", "pack"}, out
    status = dvc("status", cwd=external_project).stdout
    changed = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}
    assert "train" in changed and changed <= MODEL_SIDE | {"evaluate"}, status
    index = json.loads((external_project / "data" / "shards" / "index.json").read_text())
    assert index["aligned"] == EXTERNAL_IMAGES["sim_folder"]
    info = training_set_info(load_params(params))  # what evaluate will record: names can be checked now
    assert info["name"] == "sim_folder" and info["identity_names_checkable"]
    # the project's last test: no switching back (it would retrain sim_rec, as the train stage's
    # persisted dvclive metrics keep DVC's run cache from restoring it)
