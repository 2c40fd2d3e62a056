"""The model the train stage optimises, and one optimiser step on it.

:class:`PairModel` is the embedding net (:mod:`pipeline.recognition.models`) + the ArcFace head
(:mod:`pipeline.train.losses`), with both twins of a pair through the net in one batch;
:func:`build_pair_model` seeds it with its Adam; :func:`train_step` is the step the loop
(:mod:`pipeline.train.loop`) and benchmarks/train_step.py share. bf16 autocast on CUDA,
channels_last on CUDA and CPU.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from pipeline.align.geometry import LEGACY_TEMPLATE
from pipeline.config import TrainParams
from pipeline.recognition.dlib_resnet import Affine
from pipeline.recognition.models import build_embedding_net, make_net
from pipeline.train.losses import ArcFace, PairLoss, pair_loss


def channels_last(device: torch.device) -> bool:
    """NHWC activations: faster convolutions with cuDNN, and with oneDNN on CPU (ResNet18 step +9%
    on 2 cores)."""
    return device.type in ("cuda", "cpu")


def autocast_for(device: torch.device, bf16: bool) -> Callable[[], Any]:
    """bf16 autocast on CUDA (the tensor cores' fast path); plain fp32 elsewhere."""
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


class PairModel(nn.Module):
    """Embedding net + ArcFace head; one forward = both twins through the net in one batch (shared
    BN statistics, one kernel launch) and the pair loss. DDP wraps this."""

    def __init__(self, net: nn.Module, head: ArcFace, params: TrainParams, teacher: nn.Module | None = None):
        super().__init__()
        self.net, self.head, self.p, self.ce_weight = net, head, params.distill, params.arcface.weight
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> "PairModel":
        super().train(mode)
        if self.teacher is not None:  # the frozen teacher always embeds as at inference
            self.teacher.eval()
        return self

    def forward(self, raw: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor) -> PairLoss:
        emb = self.net(torch.cat([raw, masked]))
        e_raw, e_masked = emb.float().chunk(2)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(raw).float()
        with torch.autocast(emb.device.type, enabled=False):  # margins and cosines in fp32
            return pair_loss(self.head, e_raw, e_masked, labels, kind=self.p.kind, beta=self.p.beta,
                             margin=self.p.margin, dynamic=self.p.dynamic, stop_grad=self.p.stop_grad,
                             ce_weight=self.ce_weight, teacher=teacher, raw_weight=self.p.raw_weight)


def build_pair_model(params: TrainParams, num_classes: int, device: torch.device,
                     template: str = LEGACY_TEMPLATE) -> tuple[PairModel, torch.optim.Optimizer]:
    """Seeded embedding net + ArcFace head (+ the frozen teacher: a copy of the starting net) on
    ``device`` (channels_last where it helps) and its Adam: the pretrained network's parameters at
    ``lr * backbone_lr_ratio``, the new ones (ArcFace centres; a torchvision net's new head) at
    ``lr``; dlib_resnet's folded BatchNorm (affine) layers frozen with ``freeze_affine``."""
    torch.manual_seed(params.seed)
    net = build_embedding_net(params.backbone, params.embedding_dim, params.dropout,
                              params.pretrained, params.pretrained_path, template)
    dim = net.config["embedding_dim"]
    head = ArcFace(dim, num_classes, params.arcface.s, params.arcface.m)
    teacher = None
    if params.distill.teacher == "frozen":  # a second copy of the starting weights
        teacher = make_net(net.config["backbone"], net.config["embedding_dim"], net.config["dropout"], template)
        teacher.load_state_dict(net.state_dict())
    model = PairModel(net, head, params, teacher).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if params.freeze_affine:
        for m in net.modules():
            if isinstance(m, Affine):
                m.requires_grad_(False)
    pretrained, new = [], list(head.parameters())
    for name, p in net.named_parameters():
        if p.requires_grad:
            fresh = params.pretrained == "imagenet" and name.startswith("head.")
            (new if fresh or params.pretrained == "none" else pretrained).append(p)
    groups = [{"params": new, "lr_ratio": 1.0}]
    if pretrained:
        groups.append({"params": pretrained, "lr_ratio": params.backbone_lr_ratio})
    # fused Adam: one kernel over all tensors; the per-tensor loop costs ~7% of a CPU step
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(groups, lr=params.lr, weight_decay=params.weight_decay, fused=fused or None)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, *, lr: float, grad_clip: float,
               device: torch.device, autocast: Any = nullcontext) -> PairLoss:
    """One optimiser step on a batch of twins (the loop and benchmarks/train_step.py share it)."""
    raw, masked, labels = (t.to(device, non_blocking=True) for t in batch)
    if channels_last(device):
        raw = raw.contiguous(memory_format=torch.channels_last)
        masked = masked.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    with autocast():
        out = model(raw, masked, labels)
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out
