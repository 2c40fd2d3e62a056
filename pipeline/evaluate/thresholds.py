"""1:N decision thresholds for `identify`: set on people no choice was tested on, with identify's
own enrolment, for the size of the gallery that will be searched, as a false-positive
identification rate (FPIR: the share of strangers' searches that return somebody).

A 1:1 threshold does not carry to 1:N: a stranger searched against N people is let in when ANY of
the N scores passes, about N times as often. So the thresholds here are measured on searches:

- **Enrolment** as identify does it: each person with >= 2 photos enrols the mean template
  (:func:`pipeline.metrics.enrol`) of a seeded half of them (at least one); the other photos are
  that person's mated searches. People with one photo are strangers only.
- **Strangers**: every photo searches against everybody else's templates (leave-one-person-out:
  its own person's template, which its enrolment photos built, is not in that search), so each
  stranger search meets ``M`` = the other enrolled people and every photo is one.
- **FPIR at gallery size N <= M** is exact, not sampled: a stranger search whose ``b`` of ``M``
  scores are <= t returns nobody from a random gallery of N of those people with probability
  C(b, N) / C(M, N); FPIR_N(t) is the mean of 1 minus that over the stranger searches. The
  threshold for a target is the smallest t with FPIR_N(t) <= target (reachable only where
  searches x target >= :data:`pipeline.metrics.MIN_FALSE_ACCEPTS`).
- **N > M** (more people than the calibration set had): extrapolated from the per-comparison
  false-accept rate assuming independent comparisons, FAR1 = 1 - (1 - FPIR)^(1/N); marked as such.
- **FNIR** (a mated search that misses: its person not first, or not above t) and FPIR at each
  target's threshold with the whole set enrolled, with intervals from a bootstrap over people.

Where these come from: the validate stage (validation people: raw photos enrolled, masked twins
searching, the access-control case) writes validation/thresholds.json; `python -m
pipeline.calibrate` does the same on a deployer's own labelled folder, as its photos are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.bootstrap import draw_identities, interval, replicate
from pipeline.metrics import FPIR_TARGETS, MIN_FALSE_ACCEPTS, enrol, rate_key, reachable, threshold_at_rate
from pipeline.seeding import item_rng

# gallery sizes a thresholds file holds a threshold for; identify takes the first >= its gallery
GALLERY_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000)


class ThresholdError(ValueError):
    pass


def split_enrolment(identities: list[str], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(enrolled row mask, probe row mask): a seeded half (at least one) of the photos of each
    person with >= 2 photos is enrolled, the rest probe; a one-photo person's photo probes only."""
    ids = np.asarray(identities)
    enrolled = np.zeros(ids.size, bool)
    for name in sorted(set(identities)):
        rows = np.flatnonzero(ids == name)
        if rows.size >= 2:
            pick = item_rng(seed, "enrol", name).permutation(rows.size)[:max(1, rows.size // 2)]
            enrolled[rows[pick]] = True
    return enrolled, ~enrolled


def _log_choose(n: np.ndarray, k: int) -> np.ndarray:
    """log C(n, k) for integer arrays n >= k."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(n.max()) + 1, dtype=np.float64)))])
    n = n.astype(np.int64)
    return log_fact[n] - log_fact[k] - log_fact[n - k]


def fpir_at(scores: np.ndarray, valid: np.ndarray, t: float, n: int) -> float:
    """Mean over stranger searches of P(some score > t among a random n of its valid ones)."""
    m = valid.sum(axis=1)
    below = ((scores <= t) & valid).sum(axis=1)
    ok = below >= n
    p_none = np.zeros(below.size)
    if ok.any():
        p_none[ok] = np.exp(_log_choose(below[ok], n) - _log_choose(m[ok], n))
    return float(np.mean(1.0 - p_none))


def threshold_at_fpir(scores: np.ndarray, valid: np.ndarray, fpir: float, n: int) -> float:
    """The smallest candidate t (a stranger score, or just below the lowest) with FPIR_n(t) <= fpir."""
    cands = np.unique(scores[valid])
    lo, hi = 0, cands.size - 1  # FPIR_n falls as t rises; at the top score it is 0
    if fpir_at(scores, valid, float(np.nextafter(cands[0], -np.inf)), n) <= fpir:
        return float(np.nextafter(cands[0], -np.inf))
    while lo < hi:
        mid = (lo + hi) // 2
        if fpir_at(scores, valid, float(cands[mid]), n) <= fpir:
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo])


@dataclass(frozen=True)
class Searches:
    """Every search of a calibration set against its enrolled templates."""

    scores: np.ndarray  # every photo x enrolled people
    own: np.ndarray  # the photo's own person's column
    identities: np.ndarray  # whose photo
    probe: np.ndarray  # not an enrolment photo: may search as a mated probe
    enrolled: int

    @property
    def valid(self) -> np.ndarray:  # a stranger search meets everybody but its own person
        return ~self.own

    @property
    def mated(self) -> np.ndarray:
        return self.probe & self.own.any(axis=1)

    @property
    def gallery_size(self) -> int:
        return int(self.valid.sum(axis=1).min())


def searches(enrol_embeddings: np.ndarray, probe_embeddings: np.ndarray, identities: list[str], *, seed: int,
             source: str = "") -> Searches:
    """Row i of both arrays is photo i (unit vectors); :func:`split_enrolment` decides which
    photos enrol (``enrol_embeddings``, mean templates) and which search as mated probes; every
    photo (``probe_embeddings``) searches as a stranger to the others."""
    ids = np.asarray(identities)
    enrolled, probe = split_enrolment(identities, seed=seed)
    names, templates = enrol(list(ids[enrolled]), enrol_embeddings[enrolled])
    if len(names) < 2:
        raise ThresholdError(f"{source}: {len(names)} people with >= 2 photos; a 1:N threshold needs at least 2")
    return Searches(probe_embeddings @ templates.T, ids[:, None] == np.asarray(names)[None, :], ids, probe,
                    len(names))


def rates_at(s: Searches, t: float, *, seed: int, replicates: int, level: float) -> dict:
    """FPIR (a stranger search returning anybody above ``t``) and FNIR (a mated search whose own
    person is not first or not above ``t``) with everybody enrolled, each with a bootstrap
    interval over the searching people."""
    top_other = np.where(s.valid, s.scores, -np.inf).max(axis=1)
    own_score = np.where(s.own, s.scores, -np.inf).max(axis=1)
    mated = s.mated
    hit = mated & (own_score >= s.scores.max(axis=1))
    false_pos = (top_other > t).astype(np.float64)
    miss = (~(hit & (own_score > t))).astype(np.float64)

    def stat(i: np.ndarray) -> dict:
        mi = i[mated[i]]
        return {"fpir": false_pos[i].mean(), "fnir": miss[mi].mean() if mi.size else None}

    reps = replicate(stat, draw_identities(list(s.identities), replicates=replicates, seed=seed, tag="one_to_n"))
    return {"threshold": round(float(t), 6), "fpir": float(false_pos.mean()), "fpir_ci": interval(reps["fpir"], level),
            "fnir": float(miss[mated].mean()), "fnir_ci": interval(reps["fnir"], level)}


def calibrate(enrol_embeddings: np.ndarray, probe_embeddings: np.ndarray, identities: list[str], *, seed: int,
              source: str, probes: str, replicates: int = 1000, level: float = 0.95,
              fpirs=FPIR_TARGETS, sizes=GALLERY_SIZES) -> dict:
    """The ``one_to_n`` block of a thresholds file (module docstring): the threshold per FPIR
    target and gallery size, and the FPIR / FNIR measured at this set's own size (intervals)."""
    s = searches(enrol_embeddings, probe_embeddings, identities, seed=seed, source=source)
    valid, m, n_search = s.valid, s.gallery_size, s.scores.shape[0]
    out: dict = {"source": source, "probes": probes, "people": int(np.unique(identities).size), "enrolled": s.enrolled,
                 "enrolment": "mean template of a seeded half of each person's photos (at least 1)",
                 "mated_searches": int(s.mated.sum()), "nonmated_searches": n_search,
                 "measured_up_to_gallery_size": m, "extrapolated_above_gallery_size": m, "fpir": {}}
    flat = s.scores[valid]
    for f in fpirs:
        per_size = {}
        for n in sizes:
            if n <= m:
                per_size[str(n)] = round(threshold_at_fpir(s.scores, valid, f, n), 6) if reachable(n_search, f) else None
            else:  # beyond the calibration set: independent comparisons
                far1 = 1.0 - (1.0 - f) ** (1.0 / n)
                per_size[str(n)] = round(threshold_at_rate(flat, far1), 6) if reachable(flat.size, far1) else None
        out["fpir"][rate_key(f)] = per_size
    out["at_gallery_size"] = {"gallery_size": m, **{
        rate_key(f): rates_at(s, threshold_at_fpir(s.scores, valid, f, m), seed=seed, replicates=replicates, level=level)
        if reachable(n_search, f) else None for f in fpirs}}
    return out


def check_thresholds(entry: dict, enrol_embeddings: np.ndarray, probe_embeddings: np.ndarray, identities: list[str],
                     *, seed: int, replicates: int, level: float) -> dict:
    """Thresholds set elsewhere (``entry``: validation's) applied once to other people: per FPIR
    target, the threshold for this set's gallery size and the FPIR / FNIR it gives here."""
    s = searches(enrol_embeddings, probe_embeddings, identities, seed=seed)
    out: dict = {"people": int(np.unique(identities).size), "gallery_size": s.gallery_size,
                 "nonmated_searches": int(s.scores.shape[0]), "thresholds_from": entry["one_to_n"]["source"]}
    for f in entry["one_to_n"]["fpir"]:
        try:
            t, n, extrapolated = threshold_for(entry, f, s.gallery_size)
        except ThresholdError:
            out[f] = None
            continue
        out[f] = {"target": float(f), "set_for_gallery_size": n, "extrapolated": int(extrapolated),
                  **rates_at(s, t, seed=seed, replicates=replicates, level=level)}
    return out


def threshold_for(entry: dict, fpir: str, gallery_size: int) -> tuple[float, int, bool]:
    """(threshold, the gallery size it was set for, extrapolated?) from a thresholds file entry:
    the first size of the grid >= ``gallery_size`` (a bigger gallery needs a higher threshold for
    the same FPIR, so a smaller one meets the target at least as well)."""
    block = entry.get("one_to_n")
    if not block:
        raise ThresholdError("the thresholds entry has no 1:N block: rerun the validate stage or pipeline.calibrate")
    if fpir not in block["fpir"]:
        raise ThresholdError(f"--fpir {fpir}: the thresholds hold {', '.join(block['fpir'])}")
    sizes = sorted(int(n) for n in block["fpir"][fpir])
    fit = [n for n in sizes if n >= gallery_size]
    if not fit:
        raise ThresholdError(f"a gallery of {gallery_size} people is bigger than any the thresholds were set for "
                             f"({sizes[-1]})")
    t = block["fpir"][fpir][str(fit[0])]
    if t is None:
        raise ThresholdError(f"FPIR {fpir} at {fit[0]} people is out of reach of the {block['nonmated_searches']} "
                             f"stranger searches the thresholds were set on (need {MIN_FALSE_ACCEPTS} false "
                             f"positives): calibrate on more strangers, or pass --threshold")
    return float(t), fit[0], fit[0] > block["extrapolated_above_gallery_size"]


def find_entry(path: str | Path, info: dict) -> dict:
    """The thresholds entry made for this very embedder (model sha256, crop template, flip)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ThresholdError(f"no decision threshold: {path} not found (run `dvc repro validate` for this model, "
                             f"`python -m pipeline.calibrate` on your own photos, or pass --threshold)")
    for entry in json.loads(path.read_text()).values():
        if all(entry.get(k) == info.get(k) for k in ("model_sha256", "template", "flip")):
            return entry
    raise ThresholdError(f"{path} holds no thresholds for this model (sha256 {info.get('model_sha256')}, "
                         f"flip={info.get('flip')}): validate or calibrate it first, or pass --threshold")


def write_entry(path: str | Path, key: str, entry: dict) -> None:
    """Add or replace ``key`` in a thresholds file (other models' entries stay)."""
    import json

    from pipeline.data.tar_chunks import write_json

    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def describe(entry: dict, fpir: str, gallery_size: int) -> str:
    """One line for identify: what its decision stands for at the user's gallery size."""
    t, n, extrapolated = threshold_for(entry, fpir, gallery_size)
    how = "extrapolated" if extrapolated else "measured"
    return (f"threshold {t:.4f}: FPIR at most {fpir} (the share of strangers' searches that return somebody), "
            f"{how} for galleries of up to {n} people (yours: {gallery_size}), set on {entry['one_to_n']['source']}")
