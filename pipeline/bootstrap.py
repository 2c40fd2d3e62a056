"""Bootstrap intervals over identities, and paired differences between two embedders.

Pairs and probes of one person are correlated (the same face, the same photo session), so the
sampling unit is the identity, not the pair: each replicate draws identities with replacement and
takes every item of each drawn identity as many times as it was drawn (Bolle et al.'s "subsets
bootstrap"). A verification pair belongs to the identity of its first image, a gallery probe to its
own identity, so every item is in exactly one cluster.

Two embedders scored on the same items get the same draws (they depend only on the cluster names,
the seed and a tag), so ``model - reference`` per replicate is a paired bootstrap of the
difference. Intervals are percentile intervals; a difference is a win (``verdict`` +1) or a loss
(-1) only when its interval excludes 0, else ``verdict`` 0: within noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.seeding import item_rng


@dataclass(frozen=True)
class Draws:
    """``replicates`` index arrays into the items, each the items of one identity resample."""

    indices: list[np.ndarray]
    clusters: int


def draw_identities(cluster_of: Sequence[str], *, replicates: int, seed: int, tag: str) -> Draws:
    """Resample clusters (identities) with replacement; a drawn cluster brings all its items.

    The draws are a function of the sorted cluster names, ``seed`` and ``tag`` alone (not of item
    order), so the same protocol gives the same draws for every embedder and on every run."""
    cluster_of = np.asarray(cluster_of)
    if cluster_of.size == 0:
        raise ValueError("nothing to resample")
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    names, inv, counts = np.unique(cluster_of, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(counts)[:-1])  # item indices per cluster
    rng = item_rng(seed, "bootstrap", tag, names.size)
    out = []
    for _ in range(replicates):
        pick = rng.integers(names.size, size=names.size)
        out.append(np.concatenate([members[k] for k in pick]))
    return Draws(out, int(names.size))


def replicate(stat: Callable[[np.ndarray], dict[str, float]], draws: Draws) -> dict[str, np.ndarray]:
    """``stat(indices)`` on every replicate -> {figure: values}; a replicate on which ``stat`` fails
    (e.g. a resample without a single impostor pair) or gives None counts as NaN."""
    rows = []
    for idx in draws.indices:
        try:
            rows.append(stat(idx))
        except ValueError:
            rows.append({})
    keys = sorted({k for r in rows for k in r})
    return {k: np.array([np.nan if r.get(k) is None else float(r[k]) for r in rows], np.float64)
            for k in keys}


def interval(values: np.ndarray, level: float) -> dict[str, float] | None:
    """Percentile interval of the finite replicate values; None when fewer than half are finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.size < 0.5 * np.asarray(values).size:
        return None
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return {"low": float(lo), "high": float(hi)}


def paired_difference(point_a: float, point_b: float, reps_a: np.ndarray, reps_b: np.ndarray,
                      level: float) -> dict | None:
    """a - b with the interval of the per-replicate differences and its verdict (+1 a is better,
    -1 b is better, 0 within noise: the interval holds 0)."""
    if point_a is None or point_b is None:
        return None
    ci = interval(np.asarray(reps_a) - np.asarray(reps_b), level)
    if ci is None:
        return None
    verdict = 1 if ci["low"] > 0 else -1 if ci["high"] < 0 else 0
    return {"diff": float(point_a - point_b), **ci, "verdict": verdict}
