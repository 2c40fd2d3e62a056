"""Loss values against hand-computed numbers: ArcFace margin, each distill kind, dynamic balancing."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.losses import ArcFace, balancing_mask, distill_per_pair, pair_loss


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


@pytest.mark.parametrize("m", [0.2, 0.5, 1.0])
def test_arcface_target_logit_is_decreasing_and_continuous_in_theta(m):
    """Plain cos(theta + m) rises again past pi - m (a worse sample would earn a higher logit); the
    fallback must keep it strictly decreasing without a jump at pi - m, and leave it alone below."""
    s, step = 64.0, 0.002
    head = _head([[1.0, 0.0], [0.0, 1.0]], s=s, m=m)
    joint = math.pi - m  # a grid point, with the same spacing on both sides
    theta = torch.cat([torch.linspace(0.0, joint, round(joint / step) + 1, dtype=torch.float64),
                       torch.linspace(joint, math.pi, round(m / step) + 1, dtype=torch.float64)[1:]])
    emb = torch.stack([theta.cos(), theta.sin()], dim=1)
    logits, _ = head(emb, torch.zeros(len(theta), dtype=torch.long))
    target = logits[:, 0].double()
    diff = target.diff()
    assert (diff < 0).all(), f"rises at theta={theta[1:][diff >= 0][:3].tolist()}"
    # |d/dtheta| <= s on both branches, so no step may move it more than s * dtheta (a jump would)
    jump = diff.abs() > s * theta.diff() * (1 + 1e-3) + 1e-4
    assert not jump.any(), f"jumps by {diff[jump][:3].tolist()} at theta={theta[1:][jump][:3].tolist()}"
    below = theta < joint
    expected = s * torch.cos(theta[below] + m)
    # near theta = 0, sin = sqrt(1 - cos^2) loses float32 precision and is clamped at 1e-3 (for the
    # sqrt's gradient): off by up to s * 1e-3 * sin m there
    away = theta[below] > 0.1
    assert torch.allclose(target[below][away], expected[away], atol=s * 1e-6, rtol=0)
    assert torch.allclose(target[below], expected, atol=s * (1e-3 * math.sin(m) + 1e-6), rtol=0)


def test_arcface_without_margin_is_scaled_cosine_softmax():
    head = _head([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], s=4.0, m=0.0)
    emb = torch.tensor([[3.0, 4.0]])
    logits, cos = head(emb, torch.tensor([1]))
    assert torch.allclose(logits, 4.0 * torch.tensor([[0.6, 0.8, -0.6]]), atol=1e-5)


def test_distill_kinds_hand_computed():
    e_r = torch.tensor([[0.0, 3.0], [1.0, 0.0], [2.0, 0.0]])
    e_m = torch.tensor([[0.5, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # on unit vectors: 90, 45 and 180 degrees apart -> |u - v|^2 = 2 - 2 cos
    assert distill_per_pair(e_r, e_m, "mse").tolist() == pytest.approx([2.0, 2 - math.sqrt(2), 4.0], abs=1e-6)
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


_SCALES = {"both small": (0.01, 0.01), "both large": (100.0, 100.0), "small vs large": (0.01, 100.0),
           "per pair": (torch.tensor([0.01, 3.0, 0.2, 50.0, 1.0, 100.0])[:, None],
                        torch.tensor([7.0, 0.05, 100.0, 0.5, 0.01, 2.0])[:, None])}


@pytest.mark.parametrize("scale", list(_SCALES), ids=list(_SCALES))
@pytest.mark.parametrize("kind", ["none", "mse", "cosine", "margin_cosine"])
def test_every_distill_kind_ignores_the_embedding_scale(kind, scale):
    """ArcFace normalises, so a distillation term that shrinks with the embeddings' scale would be
    minimised by shrinking them (e.g. the last BatchNorm's weight) instead of aligning the twins."""
    a, b = _SCALES[scale]
    gen = torch.Generator().manual_seed(0)
    e_r, e_m = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    head = _head(torch.randn(3, 8, generator=gen).tolist(), s=16.0, m=0.3)
    per = distill_per_pair(e_r, e_m, kind, margin=0.1)
    per_scaled = distill_per_pair(e_r * a, e_m * b, kind, margin=0.1)
    assert torch.allclose(per_scaled, per, rtol=1e-4, atol=1e-6)
    for dynamic in (False, True):
        args = dict(kind=kind, beta=2.0, margin=0.1, dynamic=dynamic)
        out = pair_loss(head, e_r, e_m, labels, **args)
        out_scaled = pair_loss(head, e_r * a, e_m * b, labels, **args)
        assert out_scaled.distill.item() == pytest.approx(out.distill.item(), rel=1e-4, abs=1e-6)
        assert out_scaled.total.item() == pytest.approx(out.total.item(), rel=1e-4, abs=1e-6)


# Twins in 2-d, class centres on the axes (class 0 at 0 rad, class 1 at pi/2), so every cosine is
# the cosine of a known angle. Norms differ on purpose: nothing may depend on them.
_S, _M = 8.0, 0.2
_LABELS = [0, 1, 0, 1]
_RAW = [(0.1, 3.0), (1.2, 0.5), (1.0, 2.0), (0.2, 1.0)]  # (angle, norm)
_MASKED = [(0.5, 1.0), (0.6, 4.0), (0.3, 0.7), (-0.4, 1.5)]
_APART = [0.4, 0.6, 0.7, 0.6]  # angle between the twins of each pair
# margin-free argmax is class 0 below pi/4: pair 0 right on both sides, pair 1 raw only,
# pair 2 masked only, pair 3 neither


def _twins():
    head = _head([[1.0, 0.0], [0.0, 1.0]], s=_S, m=_M)
    as_xy = lambda pts: torch.tensor([[r * math.cos(a), r * math.sin(a)] for a, r in pts], requires_grad=True)
    return head, as_xy(_RAW), as_xy(_MASKED), torch.tensor(_LABELS)


def _ce(angle: float, label: int) -> float:
    """ArcFace CE by hand for 2 classes: -log softmax(s cos(theta_y + m), s cos(theta_other))."""
    cos_to = [math.cos(angle), math.sin(angle)]  # cosine to class 0 and to class 1
    theta_y = math.acos(cos_to[label])
    return math.log1p(math.exp(_S * cos_to[1 - label] - _S * math.cos(theta_y + _M)))


_CE_RAW = sum(_ce(a, y) for (a, _), y in zip(_RAW, _LABELS)) / 4
_CE_MASKED = sum(_ce(a, y) for (a, _), y in zip(_MASKED, _LABELS)) / 4


@pytest.mark.parametrize("kind, per_pair", [
    ("cosine", lambda d: 1 - math.cos(d)),
    ("mse", lambda d: 2 - 2 * math.cos(d)),
    ("margin_cosine", lambda d: 1 - math.cos(d + 0.1)),
])
def test_pair_loss_hand_computed(kind, per_pair):
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind=kind, beta=3.0, margin=0.1, dynamic=False)
    distill = sum(per_pair(d) for d in _APART) / 4
    assert out.ce_raw.item() == pytest.approx(_CE_RAW, abs=1e-5)
    assert out.ce_masked.item() == pytest.approx(_CE_MASKED, abs=1e-5)
    assert out.distill.item() == pytest.approx(distill, abs=1e-5)
    assert out.total.item() == pytest.approx(_CE_RAW + _CE_MASKED + 3.0 * distill, abs=1e-4)
    assert out.fraction.item() == 1.0
    assert out.correct_raw.tolist() == [True, True, False, False]
    assert out.correct_masked.tolist() == [True, False, True, False]


def test_dynamic_balancing_distils_only_pairs_right_on_both_sides():
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind="cosine", beta=3.0, dynamic=True)
    assert out.fraction.item() == pytest.approx(1 / 4)
    assert out.distill.item() == pytest.approx(1 - math.cos(_APART[0]), abs=1e-6)  # pair 0 alone
    assert out.total.item() == pytest.approx(_CE_RAW + _CE_MASKED + 3.0 * (1 - math.cos(_APART[0])), abs=1e-4)
    # the distillation gradient reaches the masked twin of pair 0 only: compare with beta = 0
    out.total.backward()
    with_distill = e_m.grad.clone()
    head, e_r, e_m, labels = _twins()
    pair_loss(head, e_r, e_m, labels, kind="cosine", beta=0.0, dynamic=True).total.backward()
    moved = (with_distill - e_m.grad).abs().sum(dim=1) > 1e-6
    assert moved.tolist() == [True, False, False, False]
    # no pair right on both sides: the term is zero, not NaN
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r[1:], e_m[1:], labels[1:], kind="cosine", beta=1.0, dynamic=True)
    assert out.fraction.item() == 0.0 and out.distill.item() == 0.0
    ce_by_hand = sum(_ce(a, y) for (a, _), y in zip(_RAW[1:] + _MASKED[1:], _LABELS[1:] * 2)) / 3
    assert out.total.item() == pytest.approx(ce_by_hand, abs=1e-5)


def test_none_kind_is_plain_arcface():
    head, e_r, e_m, labels = _twins()
    out = pair_loss(head, e_r, e_m, labels, kind="none", beta=10.0, dynamic=False)
    assert out.distill.item() == 0.0 and out.fraction.item() == 0.0
    assert out.total.item() == pytest.approx(_CE_RAW + _CE_MASKED, abs=1e-5)


def _distill_grads(stop_grad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d(beta * distill)/d(e_raw, e_masked) by autograd: the gradient at beta = 1 minus at beta = 0."""
    grads = []
    for beta in (1.0, 0.0):
        head, e_r, e_m, labels = _twins()
        pair_loss(head, e_r, e_m, labels, kind="cosine", beta=beta, stop_grad=stop_grad).total.backward()
        grads.append((e_r.grad.clone(), e_m.grad.clone()))
    return grads[0][0] - grads[1][0], grads[0][1] - grads[1][1]


def test_stop_grad_raw_makes_the_raw_branch_a_fixed_teacher():
    raw_fixed, masked_fixed = _distill_grads("raw")
    raw_free, masked_free = _distill_grads("none")
    assert torch.equal(raw_fixed, torch.zeros_like(raw_fixed))  # only its own CE reaches e_raw
    # d(1 - cos)/d e_r = -(u_m - cos * u_r) / |e_r|, over 4 pairs: by hand from the angles
    expected = torch.tensor([[-(math.cos(am) - math.cos(am - ar) * math.cos(ar)) / (4 * nr),
                              -(math.sin(am) - math.cos(am - ar) * math.sin(ar)) / (4 * nr)]
                             for (ar, nr), (am, _) in zip(_RAW, _MASKED)])
    assert torch.allclose(raw_free, expected, atol=1e-5)
    assert (raw_free.abs().sum(dim=1) > 1e-3).all()
    assert torch.allclose(masked_fixed, masked_free, atol=1e-6)  # the student side is unchanged
    assert (masked_free.abs().sum(dim=1) > 1e-3).all()
