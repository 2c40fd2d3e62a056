"""Loss values against hand-computed numbers: ArcFace margin, each distill kind, dynamic balancing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import ArcFace, balancing_mask, distill_per_pair, pair_loss


def _head(weight, s=10.0, m=0.5) -> ArcFace:
    head = ArcFace(embedding_dim=len(weight[0]), num_classes=len(weight), s=s, m=m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return head


def test_arcface_adds_the_angular_margin_to_the_true_class_only():
    head = _head([[1.0, 0.0], [0.0, 1.0]], s=10.0, m=0.5)
    theta = math.pi / 3
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]]) * 7.0  # norm does not matter
    logits, cos = head(emb, torch.tensor([0]))
    assert torch.allclose(cos, torch.tensor([[0.5, math.sqrt(3) / 2]]), atol=1e-6)
    assert logits[0, 0].item() == pytest.approx(10.0 * math.cos(theta + 0.5), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(10.0 * math.sqrt(3) / 2, abs=1e-5)


def test_arcface_stays_monotonic_past_pi_minus_m():
    """theta + m > pi would make cos(theta + m) rise again; insightface's fallback is cos - m sin(m)."""
    head = _head([[1.0, 0.0], [0.0, 1.0]], s=1.0, m=0.5)
    theta = math.pi - 0.2
    logits, _ = head(torch.tensor([[math.cos(theta), math.sin(theta)]]), torch.tensor([0]))
    expected = math.cos(theta) - math.sin(math.pi - 0.5) * 0.5
    assert logits[0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_arcface_without_margin_is_scaled_cosine_softmax():
    head = _head([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], s=4.0, m=0.0)
    emb = torch.tensor([[3.0, 4.0]])
    logits, cos = head(emb, torch.tensor([1]))
    assert torch.allclose(logits, 4.0 * torch.tensor([[0.6, 0.8, -0.6]]), atol=1e-5)


def test_distill_kinds_hand_computed():
    e_r = torch.tensor([[1.0, 2.0], [1.0, 0.0], [2.0, 0.0]])
    e_m = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert distill_per_pair(e_r, e_m, "mse").tolist() == pytest.approx([5.0, 1.0, 9.0])
    cos = distill_per_pair(e_r[1:], e_m[1:], "cosine")
    assert cos.tolist() == pytest.approx([1 - 1 / math.sqrt(2), 2.0], abs=1e-6)
    mc = distill_per_pair(e_r[1:], e_m[1:], "margin_cosine", margin=0.1)
    # 45 degrees + 0.1 rad; opposite twins stay capped at pi (loss 2, not cos(pi + 0.1))
    assert mc.tolist() == pytest.approx([1 - math.cos(math.pi / 4 + 0.1), 2.0], abs=1e-5)
    assert distill_per_pair(e_r, e_m, "none").tolist() == [0.0, 0.0, 0.0]


def test_margin_cosine_is_positive_for_identical_twins_and_grows_with_margin():
    e = torch.tensor([[0.3, -1.2, 0.5]])
    assert distill_per_pair(e, e, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    for m in (0.1, 0.3):
        assert distill_per_pair(e, e, "margin_cosine", margin=m).item() == pytest.approx(1 - math.cos(m), abs=1e-3)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown distill kind"):
        distill_per_pair(torch.ones(1, 2), torch.ones(1, 2), "l1")


def test_balancing_mask_needs_both_branches_right():
    labels = torch.tensor([0, 1, 0, 1])
    cos_r = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])
    cos_m = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    assert balancing_mask(cos_r, cos_m, labels).tolist() == [True, False, False, False]


def _twins():
    """Pair 0: both branches right; pair 1: raw right, masked wrong; pair 2: both wrong."""
    head = _head([[1.0, 0.0], [0.0, 1.0]], s=8.0, m=0.2)
    e_r = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.0, 1.0]], requires_grad=True)
    e_m = torch.tensor([[1.0, 0.6], [1.0, 0.3], [0.2, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    return head, e_r, e_m, labels


def test_pair_loss_sums_both_ce_and_beta_times_distill():
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind="cosine", beta=3.0, dynamic=False)
    lr, _ = head(e_r, labels)
    lm, _ = head(e_m, labels)
    per = 1 - F.cosine_similarity(e_r, e_m)
    assert out.ce_raw.item() == pytest.approx(F.cross_entropy(lr, labels).item(), abs=1e-6)
    assert out.ce_masked.item() == pytest.approx(F.cross_entropy(lm, labels).item(), abs=1e-6)
    assert out.distill.item() == pytest.approx(per.mean().item(), abs=1e-6)
    assert out.total.item() == pytest.approx(out.ce_raw.item() + out.ce_masked.item() + 3.0 * per.mean().item(), abs=1e-5)
    assert out.fraction.item() == 1.0
    assert out.correct_raw.tolist() == [True, True, False]
    assert out.correct_masked.tolist() == [True, False, False]


def test_dynamic_balancing_averages_over_correct_pairs_only():
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind="mse", beta=1.0, dynamic=True)
    assert out.fraction.item() == pytest.approx(1 / 3)
    assert out.distill.item() == pytest.approx(0.4 ** 2, abs=1e-6)  # pair 0 only: (0, -0.4)
    # no pair right on both sides: the term is zero, not NaN
    out = pair_loss(head, e_r[1:], e_m[1:], labels[1:], kind="cosine", beta=1.0, dynamic=True)
    assert out.fraction.item() == 0.0 and out.distill.item() == 0.0
    assert torch.isfinite(out.total)


def test_none_kind_is_plain_arcface():
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind="none", beta=10.0, dynamic=False)
    assert out.distill.item() == 0.0 and out.fraction.item() == 0.0
    assert out.total.item() == pytest.approx(out.ce_raw.item() + out.ce_masked.item(), abs=1e-6)


def test_stop_grad_raw_makes_the_raw_branch_a_fixed_teacher():
    grads = {}
    for stop in ("none", "raw"):
        head, e_r, e_m, labels = _twins()
        pair_loss(head, e_r, e_m, labels, kind="cosine", beta=5.0, stop_grad=stop).total.backward()
        grads[stop] = (e_r.grad.clone(), e_m.grad.clone())
    head, e_r, e_m, labels = _twins()
    F.cross_entropy(head(e_r, labels)[0], labels).backward()
    assert torch.allclose(grads["raw"][0], e_r.grad, atol=1e-6)  # only its own CE reaches e_raw
    assert not torch.allclose(grads["none"][0], e_r.grad, atol=1e-4)
    assert torch.allclose(grads["raw"][1], grads["none"][1], atol=1e-6)  # student side unchanged
