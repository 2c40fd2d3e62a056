"""The `evaluate` stage: embed every aligned test pair, score leak-free protocols, write metrics/plots.

Every embedder (the trained model, dlib's reference network) goes through the same functions on the
same aligned crops: :func:`embed_chunks` then :func:`score_embeddings`; validation
(:mod:`pipeline.evaluate.validation`) runs the same functions on the held-out train people. The dlib pass
(its torch port, :mod:`pipeline.recognition.dlib_resnet`) does not depend on the model, so the
`embed_reference` stage computes it once into a parquet that DVC caches; `evaluate` only scores it.

Outputs (``out_dir``): metrics.json (nested, so ``dvc metrics show`` flattens it to keys like
``gallery.rank1.mask_0.5``; ``identify_thresholds``: validation's 1:N thresholds checked on
the test people), plots/roc/<embedder>/<condition>.csv, plots/cmc/<embedder>/mask_<p>.csv
(DVC plot data), roc.png and cmc.png.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.align.geometry import LEGACY_TEMPLATE
from pipeline.config import BANK_MASK_TYPE, MASK_TYPES, EvaluateParams, Params
from pipeline.devices import select_device
from pipeline.recognition.embedders import Embedder, make_embedder
from pipeline.data.images import decode_rgb
from pipeline.mask.records import COVERAGE_BINS, MaskRecord, coverage_bin, read_mask_records
from pipeline.pack.shards import read_shard_set
from pipeline.bootstrap import Draws, draw_identities, interval, paired_difference, replicate
from pipeline.metrics import (FAR_TARGETS, Searches, cmc, identification_ranks, kfold_accuracy, kfold_correct,
                              open_set_figures, open_set_searches, roc_curve, tar_at_far, tar_key, thin_roc,
                              verification_metrics)
from pipeline.data.protocols import (Gallery, Pairs, build_gallery, build_open_set, build_paper_protocol,
                                     check_identity_overlap, parse_pairs)
from pipeline.data.tar_chunks import file_sha256, list_chunks, read_chunk, write_json
from pipeline.evaluate.thresholds import ThresholdError, check_thresholds, find_entry

CONDITIONS = ("unmasked_unmasked", "masked_unmasked", "masked_masked")
VIEW1_PAIRS = "pairsDevTest.txt"
VIEW2_PAIRS = "pairs.txt"


class EvaluationError(RuntimeError):
    pass


@dataclass
class EmbeddedSet:
    """Embeddings of every evaluated image: the raw crop and its masked twin, row-aligned."""

    image_ids: list[str]
    identities: list[str]
    raw: np.ndarray
    masked: np.ndarray
    embedder: dict = field(default_factory=dict)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.image_ids)}


def portion_key(p: float) -> str:
    """0 -> 'mask_0', 0.5 -> 'mask_0.5', 1 -> 'mask_1.0' (the metric names the issue fixes)."""
    return "mask_0" if p == 0 else f"mask_{float(p)}"


# ----------------------------------------------------------------------------------------------
# Embedding the aligned test set
# ----------------------------------------------------------------------------------------------

def read_aligned_chunk(path: str | Path):
    """(ids, identities, raw crops, masked crops) of one aligned chunk, sorted by id. Every sample
    must be of the split the chunk is named after (``test-000001.tar``: test)."""
    split = Path(path).name.split("-")[0]
    ids, idents, raw, masked = [], [], [], []
    for key, m in read_chunk(path):
        missing = {"raw.jpg", "masked.jpg", "json"} - set(m)
        if missing:
            raise EvaluationError(f"{path}: sample {key} lacks {sorted(missing)}")
        meta = json.loads(m["json"])
        if meta.get("split") != split:
            raise EvaluationError(f"{path}: sample {key} is in split {meta.get('split')!r}, "
                                  f"expected {split!r}")
        ids.append(key)
        idents.append(meta["identity"])
        raw.append(decode_rgb(m["raw.jpg"]))
        masked.append(decode_rgb(m["masked.jpg"]))
    order = np.argsort(ids, kind="stable")
    return ([ids[i] for i in order], [idents[i] for i in order],
            np.stack([raw[i] for i in order]) if ids else np.zeros((0, 0, 0, 3), np.uint8),
            np.stack([masked[i] for i in order]) if ids else np.zeros((0, 0, 0, 3), np.uint8))


def _embed_chunk(path, *, embedder: Embedder, flip: bool, batch_size: int):
    ids, idents, raw, masked = read_aligned_chunk(path)
    if not ids:
        return ids, idents, np.zeros((0, embedder.dim), np.float32), np.zeros((0, embedder.dim), np.float32)
    name = Path(path).name
    return (ids, idents, embedder.embed(raw, flip=flip, batch_size=batch_size, progress=f"{name} raw"),
            embedder.embed(masked, flip=flip, batch_size=batch_size, progress=f"{name} masked"))


def evaluated_splits(all_lfw: bool) -> tuple[str, ...]:
    """The LFW splits evaluated: View 1's test people when the model trained on View 1's train
    people; every LFW image when it trained on an external set (no LFW person trained on)."""
    return ("train", "test") if all_lfw else ("test",)


def aligned_eval_chunks(aligned_dir: str | Path, all_lfw: bool = False) -> list[Path]:
    folder = Path(aligned_dir) / "chunks"
    chunks = [c for split in evaluated_splits(all_lfw) for c in list_chunks(folder, prefix=f"{split}-")]
    if not chunks:
        raise EvaluationError(f"no {'/'.join(evaluated_splits(all_lfw))} chunks in {folder}: run the align stage")
    return chunks


def read_eval_identities(aligned_dir: str | Path, all_lfw: bool = False) -> set[str]:
    """Identities of the evaluated chunks (json members only: no decoding)."""
    return {json.loads(m["json"])["identity"] for c in aligned_eval_chunks(aligned_dir, all_lfw)
            for _, m in read_chunk(c)}


def aligned_template(aligned_dir: str | Path) -> str:
    """The crop template of an align stage output (its summary.json; older outputs: ArcFace 112)."""
    summary = Path(aligned_dir) / "summary.json"
    return json.loads(summary.read_text()).get("template", LEGACY_TEMPLATE) if summary.is_file() else LEGACY_TEMPLATE


def embed_chunks(embedder: Embedder | str, chunks: list[Path], *, template: str, flip: bool, batch_size: int,
                 device: str = "cpu", where: str = "") -> EmbeddedSet:
    """Embed the raw and masked crops of aligned chunks (or pack's val shards: the same members),
    in batches on ``device`` (torch uses every core by itself): the one path from crops to
    embeddings that evaluate, validate and the train stage's validation share. ``"dlib"`` runs on
    the crops' ``template``; a trained model must have been trained on it."""
    if isinstance(embedder, str):
        embedder = make_embedder(embedder, device=device, template=template)
    if embedder.template.name != template:
        raise EvaluationError(f"{embedder.name} takes {embedder.template.name} crops but {where or 'the chunks'} "
                              f"hold {template} crops (align.template): rerun align, pack and train on one template")
    parts = [_embed_chunk(c, embedder=embedder, flip=flip, batch_size=batch_size) for c in chunks]
    info = embedder.describe()
    ids = [i for p in parts for i in p[0]]
    if len(set(ids)) != len(ids):
        raise EvaluationError("an image id appears in two aligned chunks")
    info["flip"] = bool(flip)
    dim = embedder.dim
    return EmbeddedSet(ids, [i for p in parts for i in p[1]],
                       np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, dim), np.float32),
                       np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, dim), np.float32), info)


def embed_aligned(embedder: Embedder | str, aligned_dir: str | Path, *, flip: bool, batch_size: int,
                  device: str = "cpu", all_lfw: bool = False) -> EmbeddedSet:
    """:func:`embed_chunks` of every evaluated aligned image (:func:`evaluated_splits`)."""
    return embed_chunks(embedder, aligned_eval_chunks(aligned_dir, all_lfw), template=aligned_template(aligned_dir),
                        flip=flip, batch_size=batch_size, device=device, where=str(aligned_dir))


def save_embeddings(emb: EmbeddedSet, path: str | Path) -> None:
    """Parquet with one row per image (id, identity, raw and masked vectors); metadata in schema."""
    dim = emb.raw.shape[1]
    table = pa.table({
        "image_id": pa.array(emb.image_ids, pa.string()),
        "identity": pa.array(emb.identities, pa.string()),
        "raw": pa.FixedSizeListArray.from_arrays(pa.array(emb.raw.ravel(), pa.float32()), dim),
        "masked": pa.FixedSizeListArray.from_arrays(pa.array(emb.masked.ravel(), pa.float32()), dim),
    }).replace_schema_metadata({"embedder": json.dumps(emb.embedder, sort_keys=True)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def load_embeddings(path: str | Path) -> EmbeddedSet:
    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(b"embedder", b"{}"))
    n = t.num_rows

    def mat(col: str) -> np.ndarray:
        if n == 0:
            return np.zeros((0, 0), np.float32)
        arr = t.column(col).combine_chunks()
        return arr.values.to_numpy().reshape(n, -1).astype(np.float32)

    return EmbeddedSet(t.column("image_id").to_pylist(), t.column("identity").to_pylist(),
                       mat("raw"), mat("masked"), meta)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def pair_scores(emb: EmbeddedSet, pairs: Pairs) -> tuple[dict[str, np.ndarray], Pairs, int]:
    """Cosine scores per condition for the pairs whose two images were evaluated.

    masked_unmasked masks the second image of every pair (the probe side); masked_masked both.
    Returns (scores per condition, pairs kept, number of pairs missing an image).
    """
    idx = emb.index()
    keep = np.array([a in idx and b in idx for a, b in zip(pairs.a, pairs.b)], bool)
    kept = pairs.subset(keep)
    ia = np.array([idx[a] for a in kept.a], np.int64)
    ib = np.array([idx[b] for b in kept.b], np.int64)

    def cos(x, y):
        return np.einsum("ij,ij->i", x, y).astype(np.float64)

    scores = {"unmasked_unmasked": cos(emb.raw[ia], emb.raw[ib]),
              "masked_unmasked": cos(emb.raw[ia], emb.masked[ib]),
              "masked_masked": cos(emb.masked[ia], emb.masked[ib])}
    return scores, kept, int((~keep).sum())


Replicates = dict[tuple[str, ...], np.ndarray]  # figure's path in metrics.json -> bootstrap values


def _attach_intervals(section: dict, reps: dict[str, np.ndarray], level: float) -> None:
    """``<figure>_ci`` ({low, high}, or None) next to each figure of ``section`` with replicates."""
    for k, v in reps.items():
        if section.get(k) is not None:
            section[f"{k}_ci"] = interval(v, level)


def _verification_replicates(scores: np.ndarray, pairs: Pairs, figures: dict, draws: Draws) -> dict:
    """Accuracy (10-fold, thresholds chosen inside each replicate) and each reachable TAR@FAR."""
    fars = [far for far in FAR_TARGETS if figures[tar_key(far)] is not None]

    def stat(idx: np.ndarray) -> dict:
        s, y = scores[idx], pairs.same[idx]
        out = {"accuracy": kfold_accuracy(s, y, pairs.fold[idx]).accuracy}
        if fars:
            fpr, tpr, _ = roc_curve(s, y)
            out.update({tar_key(far): tar_at_far(fpr, tpr, far) for far in fars})
        return out

    return replicate(stat, draws)


def score_verification(emb: EmbeddedSet, pairs: Pairs, params: EvaluateParams | None = None
                       ) -> tuple[dict, dict, Replicates]:
    """Verification metrics per condition, ROC curves for plotting and, with ``params``, bootstrap
    replicates over identities (a pair counts for the identity of its first image), whose
    intervals are written next to the figures as ``<figure>_ci``."""
    scores, kept, missing = pair_scores(emb, pairs)
    if kept.same.all() or not kept.same.any():
        raise EvaluationError(f"{pairs.source}: after dropping {missing} pairs with an image that was "
                              f"not evaluated, same and different pairs are no longer both present")
    draws = None
    if params is not None:
        idx = emb.index()
        draws = draw_identities([emb.identities[idx[a]] for a in kept.a], replicates=params.bootstrap_replicates,
                                seed=params.seed, tag=f"pairs:{pairs.source}")
    metrics, curves, reps = {}, {}, {}
    for cond in CONDITIONS:
        m = verification_metrics(scores[cond], kept.same, kept.fold)
        m["pairs_missing"] = missing
        if draws is not None:
            r = _verification_replicates(scores[cond], kept, m, draws)
            _attach_intervals(m, r, params.ci_level)
            m["bootstrap_identities"] = draws.clusters
            reps.update({(cond, k): v for k, v in r.items()})
        metrics[cond] = m
        fpr, tpr, _ = roc_curve(scores[cond], kept.same)
        curves[cond] = thin_roc(fpr, tpr)
    return metrics, curves, reps


def _probe_embeddings(emb: EmbeddedSet, rows: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Rows of ``emb``: the masked twin where ``masked`` is set, the raw crop elsewhere."""
    return np.where(masked[:, None], emb.masked[rows], emb.raw[rows])


def score_gallery(emb: EmbeddedSet, gallery: Gallery, portions, max_rank: int,
                  params: EvaluateParams | None = None) -> tuple[dict, dict, Replicates]:
    """rank-1 / rank-5 / CMC per mask portion: enrolled raw crops vs probes masked with prob. p;
    with ``params``, rank-1's bootstrap over the probes' identities (the gallery stays whole)."""
    idx = emb.index()
    g = np.array([idx[i] for i in gallery.enrolled], np.int64)
    pr = np.array([idx[i] for i in gallery.probes], np.int64)
    max_rank = min(max_rank, len(set(gallery.enrolled_identity)))
    out = {"rank1": {}, "rank5": {}, "probes_masked": {}}
    curves, hits = {}, {}
    for p in portions:
        use_masked = gallery.masked(p)
        ranks = identification_ranks(emb.raw[g], gallery.enrolled_identity, _probe_embeddings(emb, pr, use_masked),
                                     gallery.probe_identity)
        curve = cmc(ranks, max_rank)
        key = portion_key(p)
        out["rank1"][key] = float(curve[0])
        out["rank5"][key] = float(curve[min(4, max_rank - 1)])
        out["probes_masked"][key] = int(use_masked.sum())
        curves[key] = curve
        hits[key] = (ranks == 1).astype(np.float64)
    out["identities_enrolled"] = len(gallery.enrolled)
    out["probes"] = len(gallery.probes)
    out["identities_single_image_skipped"] = gallery.notes.get("identities_single_image_skipped", 0)
    reps: Replicates = {}
    if params is not None:
        draws = draw_identities(gallery.probe_identity, replicates=params.bootstrap_replicates,
                                seed=params.seed, tag="gallery")
        r = replicate(lambda i: {k: h[i].mean() for k, h in hits.items()}, draws)
        out["rank1_ci"] = {k: interval(v, params.ci_level) for k, v in r.items()}
        out["bootstrap_identities"] = draws.clusters
        reps = {("rank1", k): v for k, v in r.items()}
    return out, curves, reps


def score_open_set(emb: EmbeddedSet, gallery: Gallery, portions, seed: int,
                   params: EvaluateParams | None = None) -> tuple[dict, Replicates]:
    """DIR at FPIR 1% and 10% per mask portion (:func:`pipeline.metrics.open_set_figures`): half
    the gallery identities enrolled (raw), the other half searching as strangers; probes of both
    kinds masked with probability p. With ``params``, DIR's bootstrap over identities: mated and
    stranger identities are drawn together, the threshold is set again in each replicate."""
    split = build_open_set(gallery, seed=seed)
    idx = emb.index()
    g = np.array([idx[i] for i in split.enrolled], np.int64)
    mated = np.array([idx[i] for i in split.mated], np.int64)
    nonmated = np.array([idx[i] for i in split.nonmated], np.int64)
    out: dict = {"identities_enrolled": len(split.enrolled), "mated_probes": len(split.mated),
                 "nonmated_probes": len(split.nonmated)}
    draws = None
    if params is not None:
        who = list(split.mated_identity) + [emb.identities[i] for i in nonmated]
        draws = draw_identities(who, replicates=params.bootstrap_replicates, seed=params.seed, tag="open_set")
    reps: Replicates = {}
    for p in portions:
        mm, nm = split.masked(p)
        found = open_set_searches(emb.raw[g], split.enrolled_identity, _probe_embeddings(emb, mated, mm),
                                  split.mated_identity, _probe_embeddings(emb, nonmated, nm))
        res = open_set_figures(found)
        key = portion_key(p)
        for k, v in res.items():
            out.setdefault(k, {})[key] = v
        if draws is None:
            continue
        n_mated = len(mated)
        dir_keys = [k for k, v in res.items() if k.startswith("dir_at_fpir_") and v is not None]

        def stat(i: np.ndarray) -> dict:
            m, n = i[i < n_mated], i[i >= n_mated] - n_mated
            if m.size == 0 or n.size == 0:  # a resample of strangers only, or of enrolled people only
                return {}
            figs = open_set_figures(Searches(found.hit[m], found.top_mated[m], found.top_nonmated[n]))
            return {k: figs[k] for k in dir_keys}

        for k, v in replicate(stat, draws).items():
            out.setdefault(f"{k}_ci", {})[key] = interval(v, params.ci_level)
            reps[(k, key)] = v
    if draws is not None:
        out["bootstrap_identities"] = draws.clusters
    return out, reps


def _mask_groups(records: list[MaskRecord], unseen: list[str]) -> dict[tuple[str, ...], np.ndarray]:
    """Item masks per group: seen / unseen type, each type, each coverage bin (fixed bins)."""
    types = np.array([r.mask_type for r in records])
    bins = np.array([coverage_bin(r.coverage) for r in records])
    out = {("seen",): ~np.isin(types, unseen), ("unseen",): np.isin(types, unseen)}
    out |= {("type", t): types == t for t in MASK_TYPES}
    if (types == BANK_MASK_TYPE).any():  # real masks from the bank, where the mask stage drew any
        out[("type", BANK_MASK_TYPE)] = types == BANK_MASK_TYPE
    out |= {("coverage", name): bins == name for name, _, _ in COVERAGE_BINS}
    return out


def _grouped_means(values: np.ndarray, groups: dict[tuple[str, ...], np.ndarray], draws: Draws | None,
                   level: float) -> tuple[dict, Replicates]:
    """Mean of ``values`` per group (None for an empty one), its count, ``seen_minus_unseen``;
    with ``draws`` each with a bootstrap interval (a replicate without an item of a group: NaN)."""
    out: dict = {"count": {}}
    for path, g in groups.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = float(values[g].mean()) if g.any() else None
        out["count"]["_".join(path)] = int(g.sum())
    seen, unseen = groups[("seen",)], groups[("unseen",)]
    out["seen_minus_unseen"] = (out["seen"] - out["unseen"]) if seen.any() and unseen.any() else None
    reps: Replicates = {}
    if draws is None:
        return out, reps

    def stat(idx: np.ndarray) -> dict:
        r = {path: values[idx[g[idx]]].mean() if g[idx].any() else None for path, g in groups.items()}
        if r[("seen",)] is not None and r[("unseen",)] is not None:
            r[("seen_minus_unseen",)] = r[("seen",)] - r[("unseen",)]
        return {"/".join(k): v for k, v in r.items()}

    for key, v in replicate(stat, draws).items():
        path = tuple(key.split("/"))
        node = out
        for k in path[:-1]:
            node = node[k]
        if node.get(path[-1]) is not None:
            node[f"{path[-1]}_ci"] = interval(v, level)
            reps[path] = v
    return out, reps


def score_by_mask(emb: EmbeddedSet, pairs: Pairs, gallery: Gallery, masks: dict[str, MaskRecord],
                  unseen: list[str], params: EvaluateParams | None = None) -> tuple[dict, Replicates]:
    """Figures per kind of mask: masked-unmasked verification accuracy with the pairs grouped by
    the probe's mask (the second image: the masked one), and gallery rank-1 with every probe
    masked, grouped by each probe's mask; groups: mask types seen vs unseen in training
    (``unseen``: pack.unseen_mask_types), each type, each coverage bin
    (:data:`pipeline.mask.records.COVERAGE_BINS`). ``seen_minus_unseen`` > 0: unseen types do
    worse. A pair is right or wrong at the threshold chosen on the other folds (the condition's
    10-fold accuracy), so a group's accuracy is the share of its pairs the protocol gets right.
    With ``params``, intervals from the bootstrap draws of verification and gallery (the same
    draws, so model - dlib per group is paired)."""
    missing = {i for i in [*pairs.b, *gallery.probes] if i in emb.index()} - set(masks)
    if missing:
        raise EvaluationError(f"{len(missing)} evaluated images have no mask record (e.g. {sorted(missing)[:2]})")
    scores, kept, _ = pair_scores(emb, pairs)
    right = kfold_correct(scores["masked_unmasked"], kept.same, kept.fold)
    idx = emb.index()
    ranks = identification_ranks(emb.raw[[idx[i] for i in gallery.enrolled]], gallery.enrolled_identity,
                                 emb.masked[[idx[i] for i in gallery.probes]], gallery.probe_identity)
    hits = (ranks == 1).astype(np.float64)
    pair_draws = gallery_draws = None
    if params is not None:
        pair_draws = draw_identities([emb.identities[idx[a]] for a in kept.a], replicates=params.bootstrap_replicates,
                                     seed=params.seed, tag=f"pairs:{pairs.source}")
        gallery_draws = draw_identities(gallery.probe_identity, replicates=params.bootstrap_replicates,
                                        seed=params.seed, tag="gallery")
    level = params.ci_level if params is not None else 0.95
    v, rv = _grouped_means(right, _mask_groups([masks[b] for b in kept.b], unseen), pair_draws, level)
    g, rg = _grouped_means(hits, _mask_groups([masks[p] for p in gallery.probes], unseen), gallery_draws, level)
    out = {"unseen_types": list(unseen), "verification_masked_unmasked": v, f"gallery_rank1_{portion_key(1.0)}": g}
    reps = {("verification_masked_unmasked", *k): x for k, x in rv.items()}
    reps |= {(f"gallery_rank1_{portion_key(1.0)}", *k): x for k, x in rg.items()}
    return out, reps


def score_identification(emb: EmbeddedSet, params: EvaluateParams, put: Callable[[str, dict, Replicates], None],
                         bootstrap: bool = True) -> tuple[Gallery, dict]:
    """The gallery (closed set, rank-1 per mask portion) and open-set sections of one embedder,
    handed to ``put(section, figures, replicates)``; returns the gallery and its CMC curves."""
    gallery = build_gallery(emb.image_ids, emb.identities, seed=params.seed)
    boot = params if bootstrap else None
    gal, cmc_curves, r = score_gallery(emb, gallery, params.mask_portions, params.cmc_max_rank, boot)
    put("gallery", gal, r)
    put("open_set", *score_open_set(emb, gallery, params.mask_portions, params.seed, boot))
    return gallery, cmc_curves


def score_embeddings(emb: EmbeddedSet, *, params: EvaluateParams, protocol_dir: str | Path,
                     train_identities: set[str], masks: dict[str, MaskRecord] | None = None,
                     unseen_types: list[str] | None = None) -> tuple[dict, dict]:
    """All metrics of one embedder, each headline figure with its bootstrap interval, and what is
    written beside them: {"roc": {cond: (fpr, tpr)}, "cmc": {portion: curve}, "replicates": {path
    in metrics: bootstrap values}}. The draws
    depend on the protocol and ``params.seed`` only, so two embedders' replicates are paired.
    With ``masks`` (the mask stage's records), a ``by_mask`` section (:func:`score_by_mask`) on
    View 1's pairs and the gallery."""
    protocol_dir = Path(protocol_dir)
    test_ids = set(emb.identities)
    overlap = check_identity_overlap(train_identities, test_ids, allow=params.allow_identity_overlap)
    metrics: dict = {"images": len(emb.image_ids), "identities": len(test_ids),
                     "identity_overlap_with_train": len(overlap)}
    reps: Replicates = {}

    def put(section: str, result: dict, r: Replicates) -> None:
        metrics[section] = result
        reps.update({(section, *k): v for k, v in r.items()})

    gallery, cmc_curves = score_identification(emb, params, put)
    view1 = parse_pairs(protocol_dir / VIEW1_PAIRS, n_folds=params.n_folds)
    check_identity_overlap(train_identities, view1.identities(), allow=params.allow_identity_overlap,
                           what="View 1 pair")
    v1, roc, r = score_verification(emb, view1, params)
    put("verification", v1, r)
    if masks is not None:
        put("by_mask", *score_by_mask(emb, view1, gallery, masks, list(unseen_types or []), params))
    view2_file = protocol_dir / VIEW2_PAIRS
    if view2_file.is_file():
        view2 = parse_pairs(view2_file)
        shared = set(train_identities) & view2.identities()
        if shared and not params.allow_identity_overlap:
            metrics["verification_view2"] = {
                "skipped": 1, "identities_shared_with_train": len(shared),
                "note": f"skipped: {len(shared)} of {len(view2.identities())} identities are training identities"}
            # View 1's 1,000 test pairs leave ~1 point of sampling noise on a mean: View 2's pairs in
            # which neither person was trained or selected on are a second, larger draw
            unseen = view2.subset(np.array([x.split("/", 1)[0] not in shared and y.split("/", 1)[0] not in shared
                                            for x, y in zip(view2.a, view2.b)], bool))
            if unseen.same.any() and (~unseen.same).any():
                v2u, _, r = score_verification(emb, unseen, params)
                put("verification_view2_unseen", {**v2u, "pairs": len(unseen)}, r)
        else:
            v2, _, r = score_verification(emb, view2, params)
            put("verification_view2", {**v2, "identities_shared_with_train": len(shared)}, r)
    if params.paper_protocol:
        paper = build_paper_protocol(emb.image_ids, emb.identities, seed=params.seed)
        pm, _, _ = score_gallery(emb, paper, params.mask_portions, params.cmc_max_rank)
        metrics["paper_protocol"] = {"rank1": pm["rank1"], "not_comparable": 1,
                                     "note": paper.notes["note"]}
    return metrics, {"roc": roc, "cmc": cmc_curves, "replicates": reps}


def figure_at(tree: dict | None, path: tuple[str, ...]):
    """The value at ``path`` of a nested metrics dict, or None where the path is absent."""
    for k in path:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


def paired_comparison(model: tuple[dict, dict], reference: tuple[dict, dict], level: float) -> dict:
    """model - reference on every figure both have replicates of, paired on the same draws:
    {section: ... {figure: {diff, low, high, verdict}}} in the layout of metrics.json."""
    (m_metrics, m_extra), (r_metrics, r_extra) = model, reference
    out: dict = {}
    for path, m_reps in sorted(m_extra["replicates"].items()):
        r_reps = r_extra["replicates"].get(path)
        if r_reps is None:
            continue
        d = paired_difference(figure_at(m_metrics, path), figure_at(r_metrics, path), m_reps, r_reps, level)
        if d is None:
            continue
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = d
    return out


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------

def round_metrics(obj, digits: int = 6):
    """Floats rounded (non-finite ones as None), recursively: what metrics.json holds."""
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: round_metrics(v, digits) for k, v in obj.items()}
    return obj


def write_plot_data(out_dir: Path, name: str, curves: dict) -> None:
    for cond, (fpr, tpr) in curves["roc"].items():
        f = out_dir / "plots" / "roc" / name / f"{cond}.csv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("fpr,tpr\n" + "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(fpr, tpr)))
    for key, curve in curves["cmc"].items():
        f = out_dir / "plots" / "cmc" / name / f"{key}.csv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("rank,identification_rate\n" +
                     "".join(f"{r},{v:.6g}\n" for r, v in enumerate(curve, start=1)))


def draw_figures(out_dir: Path, results: dict[str, tuple[dict, dict]]) -> None:
    """roc.png (one panel per condition, log FPR) and cmc.png (one panel per mask portion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = {"model": dict(color="tab:blue", lw=2), "dlib": dict(color="tab:gray", lw=1.5, ls="--")}
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(5 * len(CONDITIONS), 4.4), squeeze=False)
    for ax, cond in zip(axes[0], CONDITIONS):
        for name, (m, curves) in results.items():
            fpr, tpr = curves["roc"][cond]
            v = m["verification"][cond]
            ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{name}: acc {v['accuracy']:.3f}, AUC {v['auc']:.3f}",
                    **styles.get(name, {}))
        reach = next(iter(results.values()))[0]["verification"][cond]["far_min_reachable"]
        if reach > 1e-3:  # fewer than MIN_FALSE_ACCEPTS impostor pairs accepted left of this line
            ax.axvspan(1e-3, reach, color="0.92", zorder=0, label=f"FAR < {reach:.2g}: too few impostor pairs")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"ROC, LFW View 1 test pairs: {cond.replace('_', ' / ')}")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=90)
    plt.close(fig)

    portions = list(next(iter(results.values()))[1]["cmc"])
    fig, axes = plt.subplots(1, len(portions), figsize=(4.6 * len(portions), 4.2), squeeze=False)
    for ax, key in zip(axes[0], portions):
        for name, (m, curves) in results.items():
            curve = curves["cmc"][key]
            ax.plot(np.arange(1, len(curve) + 1), curve, marker=".",
                    label=f"{name}: rank-1 {curve[0]:.3f}", **styles.get(name, {}))
        ax.set_title(f"CMC, probes masked: {key.removeprefix('mask_')}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "cmc.png", dpi=90)
    plt.close(fig)


def evaluation_scope(params: Params) -> dict:
    """Which LFW images are evaluated, as a small file (the `eval_scope` stage): the same bytes for
    every external training set, so switching between two external sets reruns no LFW-side stage
    (embed_reference depends on this file, not on `train_set`)."""
    return {"all_lfw": params.external_training_set, "splits": list(evaluated_splits(params.external_training_set))}


def read_scope(path: str | Path) -> bool:
    """``all_lfw`` of an `eval_scope` file."""
    return bool(json.loads(Path(path).read_text())["all_lfw"])


def training_set_info(params: Params) -> dict:
    """What evaluate needs to know of the training set (recorded in metrics.json)."""
    d = params.datasets[params.train_set]
    return {"name": params.train_set, "source": d.source, "external": params.external_training_set,
            # insightface .rec sets name identities by number: overlap with LFW cannot be checked
            "identity_names_checkable": d.source != "recordio"}


def run_embed_reference(*, params: EvaluateParams, aligned_dir: str | Path, out_path: str | Path,
                        all_lfw: bool = False) -> dict:
    """dlib reference embeddings of the evaluated LFW images (an empty table when reference_dlib is
    off), through the network's torch port: batched, on the evaluation device."""
    if params.reference_dlib:
        emb = embed_aligned("dlib", aligned_dir, flip=params.flip, batch_size=params.batch_size,
                            device=str(select_device(params.device)), all_lfw=all_lfw)
    else:
        emb = EmbeddedSet([], [], np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32),
                          {"name": "dlib", "disabled": True})
    save_embeddings(emb, out_path)
    return {"images": len(emb.image_ids), "embedder": emb.embedder}


def run_evaluate(*, params: EvaluateParams, aligned_dir: str | Path, shards_dir: str | Path,
                 protocol_dir: str | Path, model_path: str | Path, out_dir: str | Path,
                 reference_path: str | Path | None = None, training_set: dict | None = None,
                 masked_dir: str | Path | None = None, thresholds_path: str | Path | None = None,
                 overlap: dict | None = None) -> dict:
    """Score the trained model (and the dlib reference when enabled) and write every output.

    ``training_set`` (:func:`training_set_info`): with an external training set every LFW image is
    evaluated (View 2's 10 folds, View 1 DevTest, the gallery over every identity); with LFW's
    View 1 train people only the View 1 test people are. ``masked_dir`` (LFW's mask stage output):
    figures per mask type and coverage (``by_mask``), seen vs unseen types as packed.
    ``thresholds_path`` (the validate stage's thresholds.json): identify's 1:N thresholds, set on
    validation people, applied once to the test people (``identify_thresholds``: the FPIR and FNIR
    they give here, raw enrolment, masked searches). ``overlap``: the overlap stage's finding
    (training people who are LFW people by face), recorded as ``training_set.overlap_by_face``."""
    out_dir = Path(out_dir)
    training_set = training_set or {"name": "lfw", "source": "lfw", "external": False,
                                    "identity_names_checkable": True}
    all_lfw = bool(training_set["external"])
    try:
        shards = read_shard_set(shards_dir)
    except FileNotFoundError as err:
        raise EvaluationError(f"{err}: evaluation needs the training identities to refuse overlap with "
                              f"the test identities") from None
    train_ids = shards.trained_identities  # the validation people too: model selection saw them
    if not training_set["identity_names_checkable"]:
        train_ids = set()  # numbered identities: no name can match an LFW name (recorded below)
    # refuse overlap before the expensive part
    check_identity_overlap(train_ids, read_eval_identities(aligned_dir, all_lfw),
                           allow=params.allow_identity_overlap)
    ref = None
    if params.reference_dlib:  # check the cached reference before the model's embedding pass
        if reference_path is None or not Path(reference_path).is_file():
            raise EvaluationError("evaluate.reference_dlib is true but the reference embeddings are "
                                  f"missing ({reference_path}): run the embed_reference stage")
        ref = load_embeddings(reference_path)
        if ref.embedder.get("disabled") or ref.embedder.get("flip") != params.flip:
            raise EvaluationError(f"{reference_path} was made with other settings ({ref.embedder}); "
                                  f"rerun the embed_reference stage")
    emb = embed_aligned(str(model_path), aligned_dir, flip=params.flip, batch_size=params.batch_size,
                        device=str(select_device(params.device)), all_lfw=all_lfw)
    masks = read_mask_records(masked_dir, emb.image_ids) if masked_dir is not None else None
    by_mask = {"masks": masks, "unseen_types": list(shards.held_out_mask_types)}
    results = {"model": score_embeddings(emb, params=params, protocol_dir=protocol_dir,
                                         train_identities=train_ids, **by_mask)}
    metrics = dict(results["model"][0])
    checks = {}
    if thresholds_path is not None:
        for name, e in (("model", emb), ("dlib", ref)):
            if e is None:
                continue
            info = {"model_sha256": "dlib" if name == "dlib" else file_sha256(model_path),
                    "template": e.embedder.get("template"), "flip": bool(params.flip)}
            try:
                entry = find_entry(thresholds_path, info)
            except ThresholdError as err:
                raise EvaluationError(f"{err} (the validate stage writes them)") from err
            checks[name] = check_thresholds(entry, e.raw, e.masked, e.identities, seed=params.seed,
                                            replicates=params.bootstrap_replicates, level=params.ci_level)
        metrics["identify_thresholds"] = checks["model"]
    metrics["embedder"] = {"flip": int(params.flip), "dim": emb.raw.shape[1]}
    metrics["training_set"] = {**training_set, "external": int(all_lfw),
                               "identity_names_checkable": int(training_set["identity_names_checkable"])}
    if overlap is not None:
        metrics["training_set"]["overlap_by_face"] = {
            k: overlap[k] for k in ("checked", "matches", "action", "threshold", "far_measurable", "same_people_caught",
                                    "train_identities", "lfw_identities") if k in overlap}
    metrics["evaluation_set"] = "LFW, all images" if all_lfw else "LFW View 1 test people"
    if ref is not None:
        if ref.image_ids != emb.image_ids:
            raise EvaluationError(f"{reference_path} holds other LFW images than {aligned_dir}; "
                                  f"rerun the embed_reference stage")
        results["dlib"] = score_embeddings(ref, params=params, protocol_dir=protocol_dir,
                                           train_identities=train_ids, **by_mask)
        metrics["reference"] = {"dlib": {**results["dlib"][0], **({"identify_thresholds": checks["dlib"]}
                                                                  if "dlib" in checks else {})}}
        metrics["vs_dlib"] = paired_comparison(results["model"], results["dlib"], params.ci_level)
    if out_dir.exists():
        for old in (out_dir / "plots").rglob("*.csv"):
            old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, curves) in results.items():
        write_plot_data(out_dir, name, curves)
    draw_figures(out_dir, results)
    metrics = round_metrics(metrics)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
