"""scripts/validate_models.py: the validate stage's figures of given models, and the rule that picks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import validate_models  # noqa: E402

from pipeline.recognition.models import build_embedding_net, interpolate_weights  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def checkpoints(tiny_shards, tmp_path_factory):
    """dlib's network saved as a checkpoint, a perturbed 'fine-tuned' one (written at wise_alpha
    0.8), and the latter moved half way back to dlib."""
    d = tmp_path_factory.mktemp("models")
    net = build_embedding_net("dlib_resnet", None, 0.0, "dlib", None, read_shard_set(tiny_shards).template)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    tuned = {k: v + 0.05 * v.std() * torch.randn_like(v) if "conv" in k else v for k, v in start.items()}
    torch.save({"model": start, "config": net.config, "meta": {}}, d / "dlib.pt")
    torch.save({"model": tuned, "config": net.config, "meta": {"wise_alpha": 0.8}}, d / "tuned.pt")
    torch.save({"model": interpolate_weights(start, tuned, 0.5), "config": net.config, "meta": {}}, d / "half.pt")
    return d


def test_dlib_and_its_checkpoint_score_alike_and_no_test_figure_is_printed(tiny_shards, checkpoints, capsys):
    validate_models.main(["dlib", str(checkpoints / "dlib.pt"), "--shards", str(tiny_shards), "--params", str(PARAMS)])
    out = capsys.readouterr().out
    dlib, saved = _rows(out)[:2]
    assert dlib["model"] == "dlib" and saved["model"].endswith("dlib.pt")
    assert set(dlib["validation"]) == {"u-u", "m-u", "m-m", "rank-1 0", "rank-1 0.5", "rank-1 1.0"}
    for title, cell in dlib["validation"].items():
        assert 0.0 <= cell["value"] <= 1.0 and cell["value"] == saved["validation"][title]["value"], title
    assert saved["validation"]["rank-1 1.0"]["vs_dlib"]["diff"] == 0.0
    # sweeps never see test: no LFW test figure in any output line
    assert all(set(r) == {"model", "wise_alpha", "identities", "pairs", "validation"} for r in _rows(out)[:2])
    assert not any(k in out for k in ("V1", "V2u", "View", '"test"'))


def test_a_name_that_is_neither_a_file_nor_a_revision_is_a_clear_error(tiny_shards):
    with pytest.raises(SystemExit, match="neither a model file nor a git revision"):
        validate_models.main(["no-such-rev-xyz", "--shards", str(tiny_shards), "--params", str(PARAMS)])


def test_a_revision_that_reads_as_a_git_option_is_refused(tmp_path):
    out = tmp_path / "written_by_git"
    with pytest.raises(SystemExit, match="neither a model file nor a git revision"):
        validate_models.cached_model(f"--output={out}")
    assert not out.exists()  # `git show --output=<file>` would have written it


def test_alphas_score_the_model_moved_towards_dlib_in_any_order(tiny_shards, checkpoints, capsys):
    """--alphas b scores a model written at wise_alpha a as start + (b / a) (model - start): as a
    checkpoint of those weights scores, whatever order the alphas come in (each starts again from
    the model's weights); --markdown ranks best m-u first."""
    common = ["--shards", str(tiny_shards), "--params", str(PARAMS)]
    # tuned.pt is the fine-tuned net written at 0.8; half.pt the fine-tuned net at 0.5 x 0.8 = 0.4
    validate_models.main([str(checkpoints / "tuned.pt"), "--alphas", "0.4,0.8,1", "--markdown", *common])
    out = capsys.readouterr().out
    rows = [r for r in _rows(out) if "model" in r]
    assert [r["wise_alpha"] for r in rows] == [0.4, 0.8, 1.0]
    validate_models.main([str(checkpoints / "tuned.pt"), "--alphas", "1,0.8,0.4", *common])
    again = {r["wise_alpha"]: r["validation"] for r in _rows(capsys.readouterr().out) if "model" in r}
    assert again == {r["wise_alpha"]: r["validation"] for r in rows}
    validate_models.main([str(checkpoints / "half.pt"), "--alphas", "1", *common])  # its own 1: as written
    half = _rows(capsys.readouterr().out)[0]
    assert half["validation"] == again[0.4]
    # no --alphas: each model as written (tuned.pt at its 0.8), never moved along the line
    validate_models.main([str(checkpoints / "tuned.pt"), str(checkpoints / "half.pt"), *common])
    as_written = [r for r in _rows(capsys.readouterr().out) if "model" in r]
    assert [r["wise_alpha"] for r in as_written] == [0.8, 1.0]
    assert as_written[0]["validation"] == again[0.8] and as_written[1]["validation"] == again[0.4]
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | wise_alpha | val u-u | val m-u |")
    mu = [float(line.split(" | ")[3].split()[0]) for line in table[2:]]
    assert mu == sorted(mu, reverse=True)


def test_the_rule_picks_the_best_masked_figure_that_does_not_forget_unmasked_faces():
    """A candidate whose unmasked accuracy is significantly below dlib's is ruled out even with
    the best masked-unmasked figure."""
    def row(name, u_verdict):
        cells = {t: {"value": 0.9, "vs_dlib": {"diff": 0.0, "low": 0.0, "high": 0.0, "verdict": 0}}
                 for t in ("u-u", "m-u", "rank-1 0")}
        cells["u-u"]["vs_dlib"]["verdict"] = u_verdict
        return {"model": name, "wise_alpha": 1.0, "validation": cells}

    sel = validate_models.SELECTION
    scored = {}
    for i, acc in enumerate((0.80, 0.95, 0.90)):
        m = {"verification": {"masked_unmasked": {"accuracy": acc}}}
        scored[i] = (m, {"replicates": {sel: torch.linspace(acc - 0.02, acc + 0.02, 200).numpy()}})
    rows = [row("dlib", 0), row("forgets", -1), row("keeps", 0)]
    picked = validate_models.choose(rows, scored, 0.95)
    assert picked["chosen"]["model"] == "keeps" and "vs_runner_up" not in picked
    rows[1] = row("forgets-not", 0)
    picked = validate_models.choose(rows, scored, 0.95)
    assert picked["chosen"]["model"] == "forgets-not" and picked["vs_runner_up"]["model"] == "keeps"
    assert picked["vs_runner_up"]["diff"] == pytest.approx(0.05)


def test_alphas_outside_the_unit_interval_are_refused(tiny_shards):
    with pytest.raises(SystemExit, match="--alphas: each must lie in"):
        validate_models.main(["dlib", "--alphas", "0,1", "--shards", str(tiny_shards), "--params", str(PARAMS)])


def test_along_the_line_past_the_written_model_recovers_the_fine_tuned_net():
    start = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    tuned = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor([3])}
    written = interpolate_weights(start, tuned, 0.7)
    back = validate_models.along_line(start, written, 1 / 0.7)
    assert torch.allclose(back["w"], tuned["w"], atol=1e-6) and torch.equal(back["n"], tuned["n"])
    assert torch.equal(validate_models.along_line(start, written, 0.5)["w"], interpolate_weights(start, written, 0.5)["w"])
