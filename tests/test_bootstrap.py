"""The identity bootstrap against values worked out by hand (the comments show the working)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.bootstrap import draw_identities, interval, paired_difference, replicate


def _rate_reps(hits: np.ndarray, who: list[str], seed: int = 0, replicates: int = 4000):
    draws = draw_identities(who, replicates=replicates, seed=seed, tag="t")
    return replicate(lambda i: {"rate": hits[i].mean()}, draws)["rate"]


def test_two_identities_give_the_three_outcomes_in_their_proportions():
    # A: 3 probes, all found; B: 1 probe, missed. A replicate draws two identities: AA (p 1/4)
    # -> 6/6 = 1.0, AB or BA (1/2) -> 3/4, BB (1/4) -> 0. The 95% interval spans [0, 1].
    hits = np.array([1.0, 1.0, 1.0, 0.0])
    reps = _rate_reps(hits, ["A", "A", "A", "B"])
    values, counts = np.unique(reps, return_counts=True)
    assert values.tolist() == [0.0, 0.75, 1.0]
    assert counts / reps.size == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    assert interval(reps, 0.95) == {"low": 0.0, "high": 1.0}


def test_draws_are_fixed_by_seed_and_names_not_by_item_order():
    who = ["B", "A", "C", "A", "B"]
    a = draw_identities(who, replicates=50, seed=3, tag="x")
    b = draw_identities(who, replicates=50, seed=3, tag="x")
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices)) and a.clusters == 3
    # the same people listed in another order draw the same identities (so the same multiset of names)
    order = [4, 2, 0, 3, 1]
    c = draw_identities([who[i] for i in order], replicates=50, seed=3, tag="x")
    names = np.asarray(who)
    shuffled = names[order]
    assert all(sorted(names[x]) == sorted(shuffled[y]) for x, y in zip(a.indices, c.indices))
    d = draw_identities(who, replicates=50, seed=4, tag="x")
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, d.indices))
    with pytest.raises(ValueError):
        draw_identities([], replicates=5, seed=0, tag="x")


def test_interval_is_as_wide_as_the_identities_not_the_pairs():
    # 20 people with 10 probes each; every probe of the first 10 is found, none of the others:
    # the rate is 0.5 and the probes of one person are perfectly correlated. Over people the rate
    # is a mean of 20 coin flips: sd sqrt(.25 / 20) = 0.112, a 95% interval ~ +-0.22. A bootstrap
    # over the 200 probes (the planted defect) would say sd 0.035, +-0.07.
    hits = np.repeat(np.r_[np.ones(10), np.zeros(10)], 10)
    who = [f"p{k:02d}" for k in range(20) for _ in range(10)]
    ci = interval(_rate_reps(hits, who), 0.95)
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 20), rel=0.15)
    per_probe = interval(_rate_reps(hits, [str(k) for k in range(200)]), 0.95)
    assert per_probe["high"] - per_probe["low"] < 0.5 * (ci["high"] - ci["low"])


def test_paired_difference_sees_a_small_gain_the_unpaired_intervals_hide():
    # 40 people, 5 probes each, the reference finding k of them (k = 0..4 by person, so its rate
    # varies a lot between resamples); the model finds one more probe than the reference for every
    # 4th person: +0.05. Paired, every replicate's difference lies in [0, 0.1] and excludes 0
    # unless no gaining person is drawn (0.75**40 ~ 1e-5): a win. The planted defect, drawing the
    # model's replicates with another seed (unpaired), mixes in the reference's spread: within noise.
    k = np.arange(40) % 5
    ref = np.concatenate([np.r_[np.ones(c), np.zeros(5 - c)] for c in k])
    gain = np.zeros(200)
    gain[[p * 5 + 4 for p in range(0, 40, 4)]] = 1.0  # probe 4 is never found by the reference
    model = np.maximum(ref, gain)
    who = [f"p{p:02d}" for p in range(40) for _ in range(5)]
    assert model.mean() - ref.mean() == pytest.approx(0.05)
    r_ref, r_model = _rate_reps(ref, who), _rate_reps(model, who)
    d = paired_difference(model.mean(), ref.mean(), r_model, r_ref, 0.95)
    assert d["diff"] == pytest.approx(0.05) and d["low"] > 0 and d["verdict"] == 1
    unpaired = paired_difference(model.mean(), ref.mean(), _rate_reps(model, who, seed=1), r_ref, 0.95)
    assert unpaired["low"] < 0 < unpaired["high"] and unpaired["verdict"] == 0
    # the other way round it is a loss
    assert paired_difference(ref.mean(), model.mean(), r_ref, r_model, 0.95)["verdict"] == -1


def test_failed_replicates_are_nan_and_too_many_give_no_interval():
    reps = replicate(lambda i: {"x": 1.0} if i.sum() > 2 else {}, draw_identities(
        ["a", "b", "c"], replicates=200, seed=0, tag="t"))
    assert np.isnan(reps["x"]).any() and np.isfinite(reps["x"]).any()
    assert interval(np.full(10, np.nan), 0.95) is None
    assert interval(np.r_[np.full(6, np.nan), np.ones(4)], 0.95) is None  # fewer than half finite
