"""ArcFace head and the pairwise distillation losses between a face and its masked twin.

Kept small and separate (like insightface arcface_torch's losses.py) so each piece can be unit
tested on hand-computed values:

- :class:`ArcFace`: additive angular margin logits ``s * cos(theta_y + m)`` for the true class,
  ``s * cos(theta_j)`` otherwise; also returns the margin-free cosines (for accuracy and for the
  dynamic balancing mask, which must not depend on the margin).
- :func:`distill_per_pair`: ``mse`` = ||e_r/|e_r| - e_m/|e_m|||^2, ``cosine`` = 1 - cos(e_r, e_m),
  ``margin_cosine`` = 1 - cos(arccos(cos(e_r, e_m)) + m_d), on the embeddings (not logits). All
  are scale-invariant, as ArcFace is: on raw embeddings ``mse`` could be lowered by shrinking the
  embedding scale (e.g. the last BatchNorm's weight) without bringing the twins' directions closer.
- :func:`balancing_mask`: the report's dynamic balancing: a pair counts only when the raw AND the
  masked branch are classified correctly.
- :func:`pair_loss`: w * (CE(raw) + CE(masked)) + beta * distill, with the parts for logging.
  With a frozen teacher's embedding t of the raw twin (template-level knowledge distillation,
  Huber et al., FG 2021) the distillation term is d(e_m, t) + raw_weight * d(e_r, t): the masked
  face is pulled to what the starting network saw unmasked, and the unmasked face is kept there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_KINDS = ("none", "mse", "cosine", "margin_cosine")
_EPS = 1e-6


class ArcFace(nn.Module):
    """Class centres W (num_classes x D); ``forward(emb, labels) -> (scaled logits, cosines)``."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        cos = cos.clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        # cos(theta + m) rises again past theta = pi - m; there the logit falls back to
        # cos(theta) - (1 - cos m), which equals -1 at pi - m, so it stays decreasing AND continuous
        # (insightface's "cos - m sin m" fallback jumps down by about m^2 / 2 there).
        sin = torch.sqrt((1.0 - target * target).clamp_min(_EPS))
        with_margin = target * math.cos(self.m) - sin * math.sin(self.m)
        th = math.cos(math.pi - self.m)
        with_margin = torch.where(target > th, with_margin, target - (1.0 - math.cos(self.m)))
        logits = cos.scatter(1, labels[:, None], with_margin) * self.s
        return logits, cos


def distill_per_pair(e_raw: torch.Tensor, e_masked: torch.Tensor, kind: str,
                     margin: float = 0.0) -> torch.Tensor:
    """Distance between each pair of embeddings (B,), by ``kind``; zeros for ``none``.

    ``mse`` is taken on L2-normalised embeddings (so it is 2 - 2 cos, twice ``cosine``): on raw
    ones its minimum is degenerate, reached by shrinking both embeddings, which ArcFace ignores.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"unknown distill kind {kind!r}; known: {list(DISTILL_KINDS)}")
    e_raw, e_masked = e_raw.float(), e_masked.float()
    if kind == "none":
        return e_raw.new_zeros(e_raw.shape[0])
    if kind == "mse":
        return (F.normalize(e_raw, dim=1) - F.normalize(e_masked, dim=1)).pow(2).sum(dim=1)
    cos = F.cosine_similarity(e_raw, e_masked, dim=1, eps=1e-8)
    if kind == "cosine":
        return 1.0 - cos
    # margin_cosine: the angle between the twins is pushed below zero by m_d (capped at pi).
    theta = torch.acos(cos.clamp(-1.0 + _EPS, 1.0 - _EPS))
    return 1.0 - torch.cos(torch.clamp(theta + margin, max=math.pi))


def balancing_mask(cos_raw: torch.Tensor, cos_masked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True where both branches' margin-free argmax is the true class (the pairs that distil)."""
    return (cos_raw.argmax(1) == labels) & (cos_masked.argmax(1) == labels)


@dataclass
class PairLoss:
    total: torch.Tensor
    ce_raw: torch.Tensor
    ce_masked: torch.Tensor
    distill: torch.Tensor  # mean over the contributing pairs (0 when none contribute)
    fraction: torch.Tensor  # share of pairs that contributed to the distillation term
    correct_raw: torch.Tensor  # (B,) bool, margin-free
    correct_masked: torch.Tensor


def pair_loss(head: ArcFace, e_raw: torch.Tensor, e_masked: torch.Tensor, labels: torch.Tensor, *,
              kind: str, beta: float, margin: float = 0.0, dynamic: bool = False,
              stop_grad: str = "none", ce_weight: float = 1.0, teacher: torch.Tensor | None = None,
              raw_weight: float = 1.0) -> PairLoss:
    """ce_weight * (CE(raw) + CE(masked)) + beta * distill for one batch of twins.

    distill is d(e_raw, e_masked) (twin distillation), or with ``teacher`` (a frozen network's
    embeddings of the raw twins) d(e_masked, teacher) + raw_weight * d(e_raw, teacher).
    ``dynamic``: only pairs classified correctly on both sides contribute, averaged over those
    pairs. ``stop_grad="raw"``: the raw branch is a fixed teacher inside the twin distillation
    term (its own CE still trains it).
    """
    if stop_grad not in ("none", "raw"):
        raise ValueError(f"stop_grad must be 'none' or 'raw', got {stop_grad!r}")
    logits_r, cos_r = head(e_raw, labels)
    logits_m, cos_m = head(e_masked, labels)
    ce_r, ce_m = F.cross_entropy(logits_r, labels), F.cross_entropy(logits_m, labels)
    with torch.no_grad():
        ok_r, ok_m = cos_r.argmax(1) == labels, cos_m.argmax(1) == labels
        both = balancing_mask(cos_r, cos_m, labels)
    if teacher is None:
        per_pair = distill_per_pair(e_raw.detach() if stop_grad == "raw" else e_raw, e_masked, kind, margin)
    else:
        teacher = teacher.detach()
        per_pair = distill_per_pair(teacher, e_masked, kind, margin)
        if raw_weight:
            per_pair = per_pair + raw_weight * distill_per_pair(teacher, e_raw, kind, margin)
    weight = both.float() if dynamic else torch.ones_like(per_pair)
    if kind == "none":
        weight = torch.zeros_like(per_pair)
    distill = (per_pair * weight).sum() / weight.sum().clamp_min(1.0)
    total = ce_weight * (ce_r + ce_m) + beta * distill
    return PairLoss(total, ce_r.detach(), ce_m.detach(), distill.detach(), weight.mean().detach(),
                    ok_r, ok_m)
