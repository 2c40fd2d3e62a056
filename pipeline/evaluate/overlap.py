"""Overlap by face, not by name: which people of an external training set are LFW people?

CASIA-WebFace and MS1M name identities by number, and are known to share people with LFW, so a
name check finds nothing. The `overlap` stage compares faces instead, with dlib's reference
network (the one every figure is paired against):

- each training identity's centroid: the normalised mean embedding (:func:`pipeline.metrics.enrol`)
  of its first ``overlap.images_per_identity`` aligned raw crops;
- each LFW identity's centroid from the `embed_reference` stage's embeddings (every LFW image when
  the training set is external);
- the threshold, calibrated on LFW itself: each LFW person with >= 2 images is split in two seeded
  halves (:func:`pipeline.evaluate.thresholds.split_enrolment`); half-centroid vs half-centroid of the same
  person are "same", of two people "different"; the threshold is the one ``overlap.far`` of the
  different ones pass (where the pairs can measure it: impostors x far >= 10; else just above
  the highest different score, and the file says which FAR that is), with the share of same
  people it catches;
- every training identity above the threshold with an LFW identity is listed (its best LFW
  match and score). ``overlap.action`` decides: ``drop`` (the pack stage leaves them out of
  training and validation, counted in index.json) or ``refuse`` (pack stops with the list).

With LFW's own View 1 split (train_set: lfw) the people are disjoint by name and nothing is
compared (``checked: 0`` with the reason).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import OverlapParams
from pipeline.evaluate.evaluation import load_embeddings, read_aligned_chunk
from pipeline.metrics import enrol, reachable, threshold_at_rate
from pipeline.data.tar_chunks import list_chunks, write_json
from pipeline.evaluate.thresholds import split_enrolment


class OverlapError(RuntimeError):
    pass


def calibrate_threshold(identities: list[str], embeddings: np.ndarray, *, far: float, seed: int) -> dict:
    """Centroid-vs-centroid threshold from one set's own people (module docstring)."""
    enrolled, rest = split_enrolment(identities, seed=seed)
    ids = np.asarray(identities)
    names_a, a = enrol(list(ids[enrolled]), embeddings[enrolled])
    keep = np.isin(ids, names_a) & rest
    names_b, b = enrol(list(ids[keep]), embeddings[keep])
    if names_a != names_b or len(names_a) < 2:
        raise OverlapError(f"calibrating the overlap threshold needs >= 2 people with >= 2 images; got {len(names_a)}")
    s = a @ b.T
    same, diff = np.diag(s), s[~np.eye(len(names_a), dtype=bool)]
    if reachable(diff.size, far):
        t, reached = threshold_at_rate(diff, far), far
    else:  # too few people to measure that FAR: just above every different-people score
        t, reached = float(np.nextafter(diff.max(), np.inf)), 1.0 / diff.size
    return {"threshold": round(float(t), 6), "far_target": far, "far_measurable": reached,
            "same_people_caught": round(float((same > t).mean()), 6), "calibration_people": len(names_a),
            "different_pairs": int(diff.size)}


def first_crops(aligned_dir: Path, per_identity: int) -> tuple[list[str], np.ndarray]:
    """(identity per crop, raw crops): the first ``per_identity`` train crops of each identity
    (chunk order, then key order)."""
    taken: dict[str, int] = {}
    idents, crops = [], []
    for chunk in tqdm(list_chunks(aligned_dir / "chunks", prefix="train-"), desc="overlap crops", unit="chunk"):
        ids, who, raw, _ = read_aligned_chunk(chunk)
        for i, name in enumerate(who):
            if taken.get(name, 0) < per_identity:
                taken[name] = taken.get(name, 0) + 1
                idents.append(name)
                crops.append(raw[i])
    if not crops:
        raise OverlapError(f"{aligned_dir}: no aligned train crops")
    return idents, np.stack(crops)


def find_overlap(train_ids: list[str], train_emb: np.ndarray, lfw_ids: list[str], lfw_emb: np.ndarray, *,
                 params: OverlapParams, seed: int) -> dict:
    calib = calibrate_threshold(lfw_ids, lfw_emb, far=params.far, seed=seed)
    t_names, t_cent = enrol(train_ids, train_emb)
    l_names, l_cent = enrol(lfw_ids, lfw_emb)
    s = t_cent @ l_cent.T
    best = s.argmax(axis=1)
    top = s[np.arange(len(t_names)), best]
    hits = sorted((i for i in range(len(t_names)) if top[i] > calib["threshold"]), key=lambda i: (-top[i], t_names[i]))
    return {"checked": 1, "train_identities": len(t_names), "lfw_identities": len(l_names), **calib,
            "action": params.action, "matches": len(hits),
            "matched": [{"train_identity": t_names[i], "lfw_identity": l_names[best[i]], "score": round(float(top[i]), 6)}
                        for i in hits]}


def run_overlap(*, params: OverlapParams, external: bool, train_aligned: str | Path, reference_path: str | Path,
                out_path: str | Path, seed: int = 0, device: str = "cpu") -> dict:
    """The overlap stage: ``out_path`` (json) says what was checked and found."""
    if not external:
        out = {"checked": 0, "reason": "LFW's own View 1 split: train and test people are disjoint by name",
               "action": params.action, "matches": 0, "matched": []}
    else:
        ref = load_embeddings(reference_path)
        if ref.embedder.get("disabled") or not ref.image_ids:
            raise OverlapError(f"{reference_path}: no dlib reference embeddings (evaluate.reference_dlib must be "
                               f"true for the overlap check)")
        from pipeline.recognition.embedders import make_embedder
        from pipeline.evaluate.evaluation import aligned_template

        idents, crops = first_crops(Path(train_aligned), params.images_per_identity)
        dlib = make_embedder("dlib", device=device, template=aligned_template(train_aligned))
        emb = dlib.embed(crops, flip=False, batch_size=128, progress="overlap dlib")
        out = find_overlap(idents, emb, ref.identities, ref.raw, params=params, seed=seed)
    write_json(out_path, out)
    return out
