"""The evaluate stage end to end on the tiny real pipeline output (ingest -> mask -> align -> pack)."""
from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from pipeline.config import MASK_TYPES, EvaluateParams
from pipeline.mask.records import read_mask_records
from pipeline.evaluate.evaluation import (CONDITIONS, EmbeddedSet, EvaluationError, embed_aligned, load_embeddings,
                                          paired_comparison, run_embed_reference, run_evaluate,
                                          score_embeddings, score_gallery, score_verification)
from pipeline.metrics import identification_ranks, l2_normalize
from pipeline.recognition.models import EmbeddingNet
from pipeline.pack.shards import read_shard_set
from pipeline.data.protocols import (Gallery, IdentityOverlapError, Pairs, build_gallery,
                                     build_paper_protocol, parse_pairs)
from tests.conftest import write_eval_pairs

VERIFICATION_KEYS = {"accuracy", "auc", "tar_at_far_1e-2", "tar_at_far_1e-3", "eer"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, lfw_small, tiny_shards):
    """The shared tiny real pipeline output (6 train + 4 test people), valid pair lists for its
    people, an untrained model in the checkpoint format and the cached dlib reference."""
    d = tmp_path_factory.mktemp("eval_inputs")
    root = tiny_shards.parent
    for name in ("masked", "aligned", "shards"):
        (d / name).symlink_to(root / name, target_is_directory=True)
    shutil.copytree(root / "ingest" / "protocol", d / "protocol")
    write_eval_pairs(lfw_small, d / "protocol")
    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", 32, template="dlib150").eval()  # the tiny pipeline's crops
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, d / "model.pt")
    params = EvaluateParams(device="cpu", batch_size=16)
    run_embed_reference(params=params, aligned_dir=d / "aligned",
                        out_path=d / "reference" / "dlib.parquet")
    # identify's 1:N thresholds, set on the validation people as the validate stage does
    from pipeline.config import ValidateParams
    from pipeline.evaluate.validation import run_validate

    run_validate(evaluate=params, validate=ValidateParams(), shards_dir=d / "shards", model_path=d / "model.pt",
                 out_dir=d / "validation")
    return d


def _evaluate(d, out, params=None, shards=None):
    return run_evaluate(params=params or PARAMS, aligned_dir=d / "aligned", shards_dir=shards or d / "shards",
                        protocol_dir=d / "protocol", model_path=d / "model.pt",
                        out_dir=out, reference_path=d / "reference" / "dlib.parquet", masked_dir=d / "masked",
                        thresholds_path=d / "validation" / "thresholds.json")


PARAMS = EvaluateParams(device="cpu", batch_size=16, paper_protocol=True)


@pytest.fixture(scope="module")
def evaluated(tiny):
    return _evaluate(tiny, tiny / "eval")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _assert_same_metrics(written: dict, computed: dict) -> None:
    """The written block is the scoring functions' output, up to the 6-digit rounding of metrics.json."""
    w, c = _flat(written), _flat(computed)
    assert set(w) == set(c)
    for k, v in c.items():
        if isinstance(v, float):
            assert w[k] == pytest.approx(v, abs=1e-6), k
        else:
            assert w[k] == v, k


def _check_keys(m: dict) -> None:
    """Shape of one embedder's block; the maths is pinned on hand-made embeddings further down."""
    assert set(m["gallery"]["rank1"]) == set(m["gallery"]["rank5"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    assert m["gallery"]["probes_masked"]["mask_0"] == 0
    assert m["gallery"]["probes_masked"]["mask_1.0"] == m["gallery"]["probes"]
    for cond in CONDITIONS:
        assert VERIFICATION_KEYS <= set(m["verification"][cond])


def test_every_metric_key_plot_and_picture_is_written(tiny, evaluated):
    metrics, out = evaluated, tiny / "eval"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics["gallery"]["rank1"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    _check_keys(metrics)
    _check_keys(metrics["reference"]["dlib"])
    # each block is exactly what the scoring functions give on that embedder's embeddings
    train = read_shard_set(tiny / "shards").trained_identities
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    emb = embed_aligned(str(tiny / "model.pt"), tiny / "aligned", flip=False, batch_size=16)
    masks = read_mask_records(tiny / "masked", emb.image_ids)
    assert metrics["by_mask"]["unseen_types"] == list(read_shard_set(tiny / "shards").held_out_mask_types)
    assert sum(metrics["by_mask"]["verification_masked_unmasked"]["count"][f"type_{t}"] for t in MASK_TYPES) == (
        metrics["verification"]["masked_unmasked"]["pairs_same"] + metrics["verification"]["masked_unmasked"]["pairs_different"])
    assert "masked_unmasked" in metrics["vs_dlib"]["verification"] and "by_mask" in metrics["vs_dlib"]
    for name, e, written in (("model", emb, metrics), ("dlib", ref, metrics["reference"]["dlib"])):
        computed, curves = score_embeddings(e, params=PARAMS, protocol_dir=tiny / "protocol",
                                            train_identities=train, masks=masks,
                                            unseen_types=list(read_shard_set(tiny / "shards").held_out_mask_types))
        _assert_same_metrics({k: v for k, v in written.items()
                               if k not in ("embedder", "reference", "training_set", "evaluation_set", "vs_dlib",
                                         "identify_thresholds")},
                             computed)
        rows = (out / "plots" / "cmc" / name / "mask_0.5.csv").read_text().splitlines()[1:]
        assert [float(r.split(",")[1]) for r in rows] == pytest.approx(curves["cmc"]["mask_0.5"], abs=1e-5)
    # LFW's View 2 lists View 1 training people: skipped, and the metrics say why
    assert metrics["verification_view2"]["skipped"] == 1
    assert "training identities" in metrics["verification_view2"]["note"]
    # ... but its pairs in which neither person was trained on are scored on their own
    view2 = parse_pairs(tiny / "protocol" / "pairs.txt")
    unseen = [x.split("/")[0] not in train and y.split("/")[0] not in train for x, y in zip(view2.a, view2.b)]
    v2u = metrics["verification_view2_unseen"]
    assert 0 < v2u["pairs"] == sum(unseen) < len(view2)
    assert v2u["unmasked_unmasked"]["pairs_same"] + v2u["unmasked_unmasked"]["pairs_different"] \
        + v2u["unmasked_unmasked"]["pairs_missing"] == sum(unseen)
    assert metrics["reference"]["dlib"]["verification_view2_unseen"]["pairs"] == sum(unseen)
    # dlib is a strong face recogniser: on unmasked photos of 4 people it must do well
    ref = metrics["reference"]["dlib"]
    assert ref["gallery"]["rank1"]["mask_0"] >= 0.8
    assert ref["verification"]["unmasked_unmasked"]["auc"] >= 0.9
    for name in ("model", "dlib"):
        for cond in CONDITIONS:
            lines = (out / "plots" / "roc" / name / f"{cond}.csv").read_text().splitlines()
            assert lines[0] == "fpr,tpr" and lines[1] == "0,0" and lines[-1] == "1,1"
        cmc = (out / "plots" / "cmc" / name / "mask_0.5.csv").read_text().splitlines()
        assert cmc[0] == "rank,identification_rate" and cmc[-1].endswith(",1")
    for png in ("roc.png", "cmc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_set_figures_and_the_validation_thresholds_checked_on_test(tiny, evaluated, tmp_path):
    """DIR at FPIR 1% / 10% per mask portion for both embedders, and `identify`'s 1:N thresholds
    (set on the validation people) applied to the test people, each embedder its own; the tiny
    set's few searches reach no FPIR target: None, not a figure. A thresholds file without this
    model's entry is refused."""
    for m in (evaluated, evaluated["reference"]["dlib"]):
        o = m["open_set"]
        assert o["identities_enrolled"] == m["gallery"]["identities_enrolled"] // 2
        assert o["identities_enrolled"] + o["mated_probes"] + o["nonmated_probes"] == \
            m["gallery"]["identities_enrolled"] + m["gallery"]["probes"]
        for key, fpir in (("dir_at_fpir_1e-2", 1e-2), ("dir_at_fpir_1e-1", 1e-1), ("rank1_mated", None)):
            assert set(o[key]) == {"mask_0", "mask_0.5", "mask_1.0"}
            # an FPIR is reported only where >= 10 strangers may pass it (the tiny set: none)
            reached = fpir is None or o["nonmated_probes"] * fpir >= 10
            assert all((v is not None) == reached for v in o[key].values()), key
            assert all(0.0 <= v <= 1.0 for v in o[key].values() if v is not None)
        assert o["nonmated_probes"] < 100 and o["dir_at_fpir_1e-1"]["mask_0"] is None
    for m in (evaluated, evaluated["reference"]["dlib"]):
        c = m["identify_thresholds"]
        assert c["people"] == m["identities"] and c["thresholds_from"].startswith("validation people (2,")
        assert c["gallery_size"] == m["identities"] - 1 and c["1e-2"] is None and c["1e-1"] is None
    other = tmp_path / "thresholds.json"
    t = json.loads((tiny / "validation" / "thresholds.json").read_text())
    other.write_text(json.dumps({"dlib": t["dlib"]}))
    with pytest.raises(EvaluationError, match="holds no thresholds for this model"):
        run_evaluate(params=PARAMS, aligned_dir=tiny / "aligned", shards_dir=tiny / "shards",
                     protocol_dir=tiny / "protocol", model_path=tiny / "model.pt", out_dir=tmp_path / "e",
                     reference_path=tiny / "reference" / "dlib.parquet", thresholds_path=other)


def test_paper_protocol_is_labelled_and_leaks(tiny, evaluated):
    """The real gallery never lets an image probe itself; the paper protocol does, for every enrolled
    image, and on real (dlib) embeddings each of those probes finds itself at cosine 1, rank 1."""
    for m in (evaluated, evaluated["reference"]["dlib"]):
        paper = m["paper_protocol"]
        assert paper["not_comparable"] == 1 and "NOT COMPARABLE" in paper["note"]
        assert set(paper["rank1"]) == {"mask_0", "mask_0.5", "mask_1.0"}
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    idx = ref.index()
    vec = l2_normalize(ref.raw)
    groups: dict[str, list[str]] = defaultdict(list)
    for i, ident in zip(ref.image_ids, ref.identities):
        groups[ident].append(i)
    multi = {k: v for k, v in groups.items() if len(v) >= 2}
    assert len(multi) == 4

    # leak-free gallery: per identity with >= 2 images one enrolled image, every other image of it a
    # probe exactly once, the enrolled one never
    g = build_gallery(ref.image_ids, ref.identities, seed=PARAMS.seed)
    assert sorted(g.enrolled_identity) == sorted(multi) and len(g.enrolled) == len(multi)
    assert not set(g.enrolled) & set(g.probes)
    for e, ident in zip(g.enrolled, g.enrolled_identity):
        assert e in multi[ident]
        mine = [p for p, i in zip(g.probes, g.probe_identity) if i == ident]
        assert Counter(mine) == Counter(x for x in multi[ident] if x != e)
    assert Counter(g.probes) == Counter(x for v in multi.values() for x in v if x not in g.enrolled)
    assert all(p.split("/")[0] == i for p, i in zip(g.probes, g.probe_identity))
    # in embedding space: no probe meets itself in the gallery. dlib's cosines are all high (0.83 to
    # 0.991 here between distinct photos) but only an image with itself reaches 1
    sim = vec[[idx[p] for p in g.probes]] @ vec[[idx[e] for e in g.enrolled]].T
    assert sim.max() < 0.999

    # the paper protocol: every image is a probe exactly once, the enrolled ones included ...
    paper = build_paper_protocol(ref.image_ids, ref.identities, seed=PARAMS.seed)
    assert Counter(paper.probes) == Counter(ref.image_ids)
    assert set(paper.enrolled) <= set(paper.probes) and len(paper.enrolled) == len(groups)
    # ... so each enrolled image, as a probe, has cosine 1 with its own gallery entry and ranks first
    pidx = [idx[p] for p in paper.probes]
    sim = vec[pidx] @ vec[[idx[e] for e in paper.enrolled]].T
    self_rows = [paper.probes.index(e) for e in paper.enrolled]
    assert sim[self_rows, range(len(paper.enrolled))] == pytest.approx(1.0, abs=1e-5)
    assert (sim[self_rows].argmax(axis=1) == np.arange(len(paper.enrolled))).all()
    ranks = identification_ranks(ref.raw[[idx[e] for e in paper.enrolled]], paper.enrolled_identity,
                                 ref.raw[pidx], paper.probe_identity)
    assert (ranks[self_rows] == 1).all()
    # the leaky rank-1 gets those for free: at least their share, and at least the leak-free one
    leaky = evaluated["reference"]["dlib"]["paper_protocol"]["rank1"]["mask_0"]
    assert leaky == pytest.approx(float((ranks == 1).mean()), abs=1e-6)
    assert leaky >= len(paper.enrolled) / len(paper.probes)
    assert leaky >= evaluated["reference"]["dlib"]["gallery"]["rank1"]["mask_0"]


def test_same_inputs_give_identical_outputs(tiny, evaluated, tmp_path):
    _evaluate(tiny, tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == (tiny / "eval" / "metrics.json").read_bytes()
    csvs = sorted((tiny / "eval" / "plots").rglob("*.csv"))
    assert len(csvs) == 2 * (3 + 3)
    for f in csvs:
        assert f.read_bytes() == (tmp_path / f.relative_to(tiny / "eval")).read_bytes()


def test_identity_overlap_is_refused_unless_allowed(tiny, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny / "shards", shards, ignore=shutil.ignore_patterns("*.tar"))
    classes = json.loads((shards / "classes.json").read_text())
    classes["Abdullah_Gul"] = len(classes)  # a test identity among the training classes
    (shards / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(IdentityOverlapError, match="Abdullah_Gul"):
        _evaluate(tiny, tmp_path / "eval", shards=shards)
    assert not (tmp_path / "eval").exists()
    # allowed: it runs and says so; View 2 runs too (its pairs cover train people whose images are
    # not in the test set: those pairs are counted as missing)
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    m, _ = score_embeddings(ref, params=EvaluateParams(allow_identity_overlap=True),
                            protocol_dir=tiny / "protocol", train_identities=set(classes))
    assert m["identity_overlap_with_train"] == 1
    assert m["verification_view2"]["masked_masked"]["pairs_missing"] > 0


def test_reference_embeddings_must_match_the_settings(tiny, tmp_path):
    ref = load_embeddings(tiny / "reference" / "dlib.parquet")
    assert ref.raw.shape[1] == 128 and len(ref.image_ids) == ref.masked.shape[0] > 20
    assert np.allclose(np.linalg.norm(ref.masked, axis=1), 1, atol=1e-4)
    with pytest.raises(EvaluationError, match="other settings"):
        _evaluate(tiny, tmp_path / "eval", params=EvaluateParams(device="cpu", flip=True))
    with pytest.raises(EvaluationError, match="missing"):
        run_evaluate(params=EvaluateParams(device="cpu"), aligned_dir=tiny / "aligned",
                     shards_dir=tiny / "shards", protocol_dir=tiny / "protocol",
                     model_path=tiny / "model.pt", out_dir=tmp_path / "e2", reference_path=tmp_path / "no.parquet")


def test_a_model_on_another_crop_template_is_refused(tiny, tmp_path):
    net = EmbeddingNet("resnet18", 8, template="arcface112").eval()
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, tmp_path / "m112.pt")
    with pytest.raises(EvaluationError, match="takes arcface112 crops but .* hold dlib150 crops"):
        run_evaluate(params=PARAMS, aligned_dir=tiny / "aligned", shards_dir=tiny / "shards",
                     protocol_dir=tiny / "protocol", model_path=tmp_path / "m112.pt", out_dir=tmp_path / "e",
                     reference_path=tiny / "reference" / "dlib.parquet")


# ----------------------------------------------------------------------------------------------
# Hand-made embeddings whose right answers are known: the scoring maths, pinned exactly
# ----------------------------------------------------------------------------------------------
# Identity k of NAMES lives on axis k. A raw crop of k embeds as e_k; its masked twin as
# e_{k+1} + 0.5 e_k (normalised): a masked face looks most like the next person and second most
# like itself, so a masked probe ranks its identity exactly 2nd while a raw one ranks it 1st.

NAMES = ["Anna", "Bert", "Cleo", "Dirk"]
DIM = 8


def _unit(*terms: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    for axis, w in terms:
        v[axis] += w
    return v / np.linalg.norm(v)


def _raw(k: int) -> np.ndarray:
    return _unit((k, 1.0))


def _masked(k: int) -> np.ndarray:
    return _unit(((k + 1) % len(NAMES), 1.0), (k, 0.5))


def _img(name: str, n: int) -> str:
    return f"{name}/{name}_{n:04d}"


def _hand_made(raw_override: dict | None = None, single: bool = False) -> EmbeddedSet:
    """3 images of each of NAMES (+ one image of 'Emil' on axis 4 when ``single``)."""
    ids, idents, raw, masked = [], [], [], []
    for k, name in enumerate(NAMES):
        for n in (1, 2, 3):
            ids.append(_img(name, n))
            idents.append(name)
            raw.append((raw_override or {}).get(ids[-1], _raw(k)))
            masked.append(_masked(k))
    if single:
        ids.append(_img("Emil", 1))
        idents.append("Emil")
        raw.append(_unit((4, 1.0)))
        masked.append(_unit((0, 1.0), (4, 0.5)))  # masked Emil looks like Anna first: rank 2 too
    return EmbeddedSet(ids, idents, np.stack(raw), np.stack(masked), {"name": "hand-made"})


def test_hand_made_gallery_gives_exact_ranks_cmc_and_mask_portions():
    emb = _hand_made({
        _img("Anna", 3): _unit((1, 1.0), (0, 0.5)),  # closer to Bert than to Anna: rank 2
        _img("Bert", 3): _unit((2, 1.0), (3, 0.6), (1, 0.3)),  # Cleo, Dirk, then Bert: rank 3
        _img("Cleo", 3): _unit((2, 1.0), (3, 1.0)),  # a tie Cleo/Dirk counts against the probe: rank 2
    })
    probes = [_img(n, i) for n in NAMES for i in (2, 3)]
    # hand-set draws: masked at p are the probes with draw < p
    draws = np.array([0.05, 0.95, 0.25, 0.75, 0.45, 0.55, 0.65, 0.15])
    gallery = Gallery([_img(n, 1) for n in NAMES], list(NAMES), probes, [p.split("/")[0] for p in probes],
                      draws)
    out, curves, _ = score_gallery(emb, gallery, [0.0, 0.3, 0.5, 1.0], max_rank=20)
    # true ranks per probe (Anna_2, Anna_3, Bert_2, Bert_3, Cleo_2, Cleo_3, Dirk_2, Dirk_3):
    #   p=0   all raw:                    1 2 1 3 1 2 1 1
    #   p=0.3 Anna_2, Bert_2, Dirk_3 masked: 2 2 2 3 1 2 1 2
    #   p=0.5 + Cleo_2 masked:            2 2 2 3 2 2 1 2
    #   p=1   all masked:                 2 2 2 2 2 2 2 2
    # CMC stops at rank 4: only 4 identities are enrolled
    expected = {"mask_0": [5 / 8, 7 / 8, 1, 1], "mask_0.3": [2 / 8, 7 / 8, 1, 1],
                "mask_0.5": [1 / 8, 7 / 8, 1, 1], "mask_1.0": [0, 1, 1, 1]}
    assert set(curves) == set(expected)
    for key, want in expected.items():
        assert curves[key].tolist() == pytest.approx(want, abs=1e-12), key
        assert (np.diff(curves[key]) >= 0).all() and curves[key][-1] == 1.0
        assert out["rank1"][key] == pytest.approx(want[0], abs=1e-12)
        assert out["rank5"][key] == 1.0  # rank 5 > 4 identities: everyone is found
    assert out["probes_masked"] == {"mask_0": 0, "mask_0.3": 3, "mask_0.5": 4, "mask_1.0": 8}
    assert (out["identities_enrolled"], out["probes"]) == (4, 8)


def _hand_made_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """4 same pairs, then 4 different pairs alternating 'b is the previous identity' (a raw A
    against a masked B scores 0.894: a masked face looks like the next person) and 'b two identities
    on' (scores 0 in every condition)."""
    same = [(_img(n, 1), _img(n, 2)) for n in NAMES]
    diff = [(_img("Bert", 1), _img("Anna", 2)), (_img("Anna", 1), _img("Cleo", 2)),
            (_img("Dirk", 1), _img("Cleo", 2)), (_img("Cleo", 1), _img("Anna", 2))]
    return same, diff


# scores per condition: same pairs / 'previous' different pairs / 'two on' different pairs
#   unmasked_unmasked  1      / 0     / 0  -> separable
#   masked_unmasked    0.447  / 0.894 / 0  -> the threshold learnt on the other fold (2 same, 1 of
#                      each different kind) lies between 0 and 0.447: accepts the same pairs and
#                      the 'previous' ones, rejects the 'two on' ones: 3 of 4 right per fold
#   masked_masked      1      / 0.4   / 0  -> separable
#   TAR@FAR: 4 impostor pairs reach no FAR of FAR_TARGETS (10 false accepts at FAR 1e-2 need
#   1,000): None, and the smallest FAR they can measure is 10 / 4, i.e. none at all.
NO_TAR = {"tar_at_far_1e-2": None, "tar_at_far_1e-3": None, "tar_at_far_1e-4": None,
          "far_min_reachable": 2.5}
EXPECTED_VERIFICATION = {
    "unmasked_unmasked": {"accuracy": 1.0, "accuracy_std": 0.0, "auc": 1.0, "eer": 0.0, **NO_TAR},
    "masked_unmasked": {"accuracy": 0.75, "accuracy_std": 0.0, "auc": 0.5, "eer": 0.5, **NO_TAR},
    "masked_masked": {"accuracy": 1.0, "accuracy_std": 0.0, "auc": 1.0, "eer": 0.0, **NO_TAR},
}


def _assert_verification(metrics: dict, missing: int) -> None:
    assert set(metrics) == set(CONDITIONS)
    for cond, want in EXPECTED_VERIFICATION.items():
        got = metrics[cond]
        for k, v in want.items():
            assert got[k] == (None if v is None else pytest.approx(v, abs=1e-9)), (cond, k)
        assert (got["pairs_same"], got["pairs_different"], got["pairs_missing"]) == (4, 4, missing)


def test_hand_made_pairs_give_exact_verification_per_condition():
    emb = _hand_made()
    same, diff = _hand_made_pairs()
    # a fifth same pair names an image that was not evaluated: dropped and counted, not scored
    pairs = same + [(_img("Anna", 1), _img("Anna", 9))] + diff
    pairs_obj = Pairs([a for a, _ in pairs], [b for _, b in pairs],
                      np.array([True] * 5 + [False] * 4), np.array([0, 0, 1, 1, 1, 0, 0, 1, 1]), "hand-made")
    metrics, curves, _ = score_verification(emb, pairs_obj)
    _assert_verification(metrics, missing=1)
    fpr, tpr = curves["masked_unmasked"]
    assert fpr.tolist() == [0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_hand_made_set_through_score_embeddings(tmp_path):
    """The real protocol builders and a View 1 pairs file on the hand-made set: exact numbers."""
    emb = _hand_made(single=True)
    same, diff = _hand_made_pairs()

    def n(i):
        return int(i.rsplit("_", 1)[1])

    lines = [f"{a.split('/')[0]}\t{n(a)}\t{n(b)}" for a, b in same]
    lines += [f"{a.split('/')[0]}\t{n(a)}\t{b.split('/')[0]}\t{n(b)}" for a, b in diff]
    (tmp_path / "pairsDevTest.txt").write_text(f"{len(same)}\n" + "".join(x + "\n" for x in lines))
    params = EvaluateParams(n_folds=2, paper_protocol=True, mask_portions=[0.0, 0.5, 1.0])
    m, curves = score_embeddings(emb, params=params, protocol_dir=tmp_path, train_identities={"Zed"})
    assert (m["images"], m["identities"], m["identity_overlap_with_train"]) == (13, 5, 0)
    _assert_verification(m["verification"], missing=0)
    assert "verification_view2" not in m  # no pairs.txt
    gal = m["gallery"]
    # Emil's single image takes no part; every other identity enrols 1 of 3 and probes with 2
    assert (gal["identities_enrolled"], gal["probes"], gal["identities_single_image_skipped"]) == (4, 8, 1)
    # a raw probe always ranks 1st, a masked one always 2nd: rank-1 is the share of raw probes
    masked_half = gal["probes_masked"]["mask_0.5"]
    assert 0 < masked_half < 8  # the seeded draws mask some probes at 0.5, not all
    assert gal["probes_masked"] == {"mask_0": 0, "mask_0.5": masked_half, "mask_1.0": 8}
    assert gal["rank1"] == {"mask_0": 1.0, "mask_0.5": (8 - masked_half) / 8, "mask_1.0": 0.0}
    assert curves["cmc"]["mask_1.0"].tolist() == [0.0, 1.0, 1.0, 1.0]
    # the paper protocol enrols all 5 (Emil too) and probes all 13 images: same picture
    paper = m["paper_protocol"]
    assert paper["not_comparable"] == 1
    assert paper["rank1"]["mask_0"] == 1.0 and paper["rank1"]["mask_1.0"] == 0.0


def test_hand_made_model_vs_reference_is_paired_per_figure(tmp_path):
    """A model whose masked embedding equals the raw one (mask-blind) against the hand-made
    reference, on the same pairs and probes: the paired differences are the point differences,
    certain where every replicate agrees, and carry each figure's layout."""
    ref = _hand_made()
    model = EmbeddedSet(ref.image_ids, ref.identities, ref.raw, ref.raw.copy(), {"name": "mask-blind"})
    same, diff = _hand_made_pairs()
    lines = [f"{a.split('/')[0]}\t{a[-1]}\t{b[-1]}" for a, b in same]
    lines += [f"{a.split('/')[0]}\t{a[-1]}\t{b.split('/')[0]}\t{b[-1]}" for a, b in diff]
    (tmp_path / "pairsDevTest.txt").write_text(f"{len(same)}\n" + "".join(x + "\n" for x in lines))
    params = EvaluateParams(n_folds=2, mask_portions=[0.0, 1.0], bootstrap_replicates=300)
    res = {name: score_embeddings(e, params=params, protocol_dir=tmp_path, train_identities=set())
           for name, e in (("model", model), ("dlib", ref))}
    vs = paired_comparison(res["model"], res["dlib"], params.ci_level)
    # rank-1 with masked probes: the reference ranks every masked probe 2nd (0.0), the mask-blind
    # model 1st (1.0), in every replicate: +1.0 in [1, 1], a win; unmasked both find all: 0, noise
    assert vs["gallery"]["rank1"]["mask_1.0"] == {"diff": 1.0, "low": 1.0, "high": 1.0, "verdict": 1}
    assert vs["gallery"]["rank1"]["mask_0"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "verdict": 0}
    # masked-unmasked verification: 1.0 against 0.75 (see EXPECTED_VERIFICATION)
    mu = vs["verification"]["masked_unmasked"]["accuracy"]
    assert mu["diff"] == pytest.approx(0.25) and mu["low"] <= 0.25 <= mu["high"]
    assert vs["verification"]["unmasked_unmasked"]["accuracy"]["diff"] == 0.0
    assert "tar_at_far_1e-2" not in vs["verification"]["masked_unmasked"]  # unreachable: no figure
    # each figure's own interval holds its point, and was drawn over the 4 identities
    for name, (m, _) in res.items():
        for key, ci in m["gallery"]["rank1_ci"].items():
            assert ci["low"] <= m["gallery"]["rank1"][key] <= ci["high"], (name, key)
        assert m["gallery"]["bootstrap_identities"] == m["verification"]["masked_unmasked"]["bootstrap_identities"] == 4


# mask records of the hand-made set: one type and coverage per identity
HAND_MASKS = {"Anna": ("n95", 0.45), "Bert": ("cloth", 0.30), "Cleo": ("surgical", 0.55), "Dirk": ("gas", 0.30)}


def _hand_masks(emb: EmbeddedSet) -> dict:
    from pipeline.mask.records import MaskRecord

    return {i: MaskRecord(*HAND_MASKS[who]) for i, who in zip(emb.image_ids, emb.identities)}


def test_hand_made_figures_per_mask_type_seen_unseen_and_coverage():
    """by_mask on the hand-made pairs, grouped by the masked image (the second of a pair):
    right / wrong per pair at the other fold's threshold (above: the same pairs and the 'two on'
    pairs right, the 'previous' ones wrong) gives, with n95 unseen,
      Anna_2 (n95, 0.45): (Anna, Anna) right, (Bert, Anna) wrong, (Cleo, Anna) right -> 2/3
      Bert_2 (cloth, 0.30): right; Dirk_2 (gas, 0.30): right
      Cleo_2 (surgical, 0.55): (Cleo, Cleo) right, (Anna, Cleo) right, (Dirk, Cleo) wrong -> 2/3
    seen = 4/5, unseen = 2/3, gap 2/15; coverage below_0.40 = 1, 0.40_0.50 = 2/3, above_0.50 = 2/3.
    Planted defects this catches: grouping by the first image (Anna_1's pairs are both right: 1.0),
    a group's figure from the pairs' own best threshold, a missing record passing silently."""
    from pipeline.evaluate.evaluation import score_by_mask

    emb = _hand_made()
    same, diff = _hand_made_pairs()
    pairs = Pairs([a for a, _ in same + diff], [b for _, b in same + diff], np.array([True] * 4 + [False] * 4),
                  np.array([0, 0, 1, 1, 0, 0, 1, 1]), "hand-made")
    gallery = build_gallery(emb.image_ids, emb.identities, seed=0)
    out, reps = score_by_mask(emb, pairs, gallery, _hand_masks(emb), ["n95"])
    v = out["verification_masked_unmasked"]
    assert out["unseen_types"] == ["n95"] and not reps  # no params: no bootstrap
    assert v["seen"] == pytest.approx(4 / 5) and v["unseen"] == pytest.approx(2 / 3)
    assert v["seen_minus_unseen"] == pytest.approx(4 / 5 - 2 / 3)
    assert v["type"] == pytest.approx({"n95": 2 / 3, "cloth": 1.0, "surgical": 2 / 3, "gas": 1.0, "kn95": None})
    assert v["coverage"] == pytest.approx({"below_0.40": 1.0, "0.40_0.50": 2 / 3, "above_0.50": 2 / 3})
    assert v["count"]["seen"] == 5 and v["count"]["unseen"] == 3 and v["count"]["type_kn95"] == 0
    # every probe masked ranks its identity 2nd: rank-1 0 in every group ...
    g = out["gallery_rank1_mask_1.0"]
    assert g["seen"] == g["unseen"] == 0.0 and g["count"]["seen"] + g["count"]["unseen"] == len(gallery.probes)
    # ... unless Anna's mask hides nothing: her probes rank 1st, unseen type n95 -> 1.0, seen 0
    anna = [i for i, who in enumerate(emb.identities) if who == "Anna"]
    blind = EmbeddedSet(emb.image_ids, emb.identities, emb.raw, emb.masked.copy(), {})
    blind.masked[anna] = emb.raw[anna]
    g = score_by_mask(blind, pairs, gallery, _hand_masks(emb), ["n95"])[0]["gallery_rank1_mask_1.0"]
    assert (g["unseen"], g["seen"], g["seen_minus_unseen"]) == (1.0, 0.0, -1.0)
    assert g["type"]["n95"] == 1.0 and g["count"]["unseen"] == sum(p.startswith("Anna/") for p in gallery.probes)
    # no unseen type: no unseen figure and no gap, the seen group is every pair
    v = score_by_mask(emb, pairs, gallery, _hand_masks(emb), [])[0]["verification_masked_unmasked"]
    assert v["unseen"] is None and v["seen_minus_unseen"] is None and v["seen"] == pytest.approx(6 / 8)
    # with the bootstrap: intervals around each figure, the gap's too; paired against a reference
    params = EvaluateParams(bootstrap_replicates=200, n_folds=2)
    out, reps = score_by_mask(emb, pairs, gallery, _hand_masks(emb), ["n95"], params)
    v = out["verification_masked_unmasked"]
    for k in ("seen", "unseen", "seen_minus_unseen"):
        assert v[f"{k}_ci"]["low"] <= v[k] <= v[f"{k}_ci"]["high"]
    assert ("verification_masked_unmasked", "type", "n95") in reps and len(reps[("verification_masked_unmasked", "seen")]) == 200
    masks = _hand_masks(emb)
    del masks[_img("Cleo", 2)]
    with pytest.raises(EvaluationError, match="no mask record"):
        score_by_mask(emb, pairs, gallery, masks, ["n95"])
