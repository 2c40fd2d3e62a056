"""Face embedding networks, looked up by name: torchvision ResNets + an embedding head, or dlib's
pretrained face ResNet (``dlib_resnet``, :mod:`pipeline.recognition.dlib_resnet`).

The backbone is torchvision's ResNet as is (so ImageNet weights load unchanged); the adaptation to
112x112 faces is the head: ResNet18 leaves a 512 x 4 x 4 map at 112 px, and instead of averaging it
away (which discards where on the face a feature is, the part a mask hides) the head keeps it, like
insightface's output layer: BN -> dropout -> flatten -> linear -> BN. "*_hr" backbones drop the max
pool (7 x 7 map, 4x the compute: for GPUs). The ArcFace head lives in pipeline/train/losses.py and is not
part of the saved embedding model.

``dlib_resnet`` is dlib's 128-D network with its weights read from the .dat file
(``pretrained: dlib``); it takes ``dlib150`` crops (its own chip) as they are and resamples
``arcface112`` crops to that chip inside its forward.

Input everywhere: B x 3 x S x S RGB scaled to [-1, 1], S the crop template's size (112 or 150,
``config["template"]``); output: B x D embeddings (not normalised; compare them by cosine).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from pipeline.align.geometry import LEGACY_TEMPLATE, get_template
from pipeline.config import BACKBONE_NAMES, DLIB_BACKBONE, PRETRAINED_FOR_BACKBONE
from pipeline.recognition.dlib_resnet import DlibEmbeddingNet


def pixels_to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB pixels (any shape) -> float32 in [-1, 1], x / 127.5 - 1: the input scale of every
    network here, for training batches (:func:`pipeline.train.pair_loader.to_batch`, as a table) and for
    embedding (:class:`pipeline.recognition.embedders.TorchEmbedder`) alike."""
    return pixels.to(torch.float32) / 127.5 - 1.0


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be read or downloaded."""


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[..., nn.Module]  # torchvision constructor
    weights: Any  # torchvision weights enum member (ImageNet)
    channels: int  # channels of the last feature map
    drop_maxpool: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet18_hr": BackboneSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512, True),
    "resnet34": BackboneSpec(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": BackboneSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 2048),
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {list(BACKBONE_NAMES)}")
    return BACKBONES[name]


def default_embedding_dim(backbone: str) -> int:
    """The backbone's own embedding size: dlib's 128, else the insightface-style head's 512."""
    return 128 if backbone == DLIB_BACKBONE else 512


def make_net(backbone: str, embedding_dim: int | None = None, dropout: float = 0.0,
             template: str = LEGACY_TEMPLATE) -> nn.Module:
    """The untrained network called ``backbone`` (random weights) for crops on ``template``;
    ``.config`` rebuilds it."""
    dim = default_embedding_dim(backbone) if embedding_dim is None else int(embedding_dim)
    if backbone == DLIB_BACKBONE:
        return DlibEmbeddingNet(dim, dropout, template)
    return EmbeddingNet(backbone, dim, dropout, template)


def feature_map_size(name: str, image_size: int) -> int:
    """Side of the last feature map (conv stride 2 and max pool round up)."""
    side = -(-image_size // 2)  # conv1
    if not _spec(name).drop_maxpool:
        side = -(-side // 2)
    for _ in range(3):  # layer2..4
        side = -(-side // 2)
    return side


class Trunk(nn.Module):
    """A torchvision ResNet without avgpool/fc: image -> C x h x w feature map."""

    def __init__(self, net: nn.Module, drop_maxpool: bool):
        super().__init__()
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = nn.Identity() if drop_maxpool else net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class EmbeddingHead(nn.Module):
    """BN -> dropout -> flatten -> linear -> BN1d (insightface's output layer)."""

    def __init__(self, channels: int, side: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.bn2d = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * side * side, embedding_dim)
        self.bn1d = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn2d(x))
        return self.bn1d(self.fc(torch.flatten(x, 1)))


class EmbeddingNet(nn.Module):
    """Backbone + embedding head; ``config`` is everything needed to rebuild it."""

    def __init__(self, backbone: str = "resnet18", embedding_dim: int = 512, dropout: float = 0.0,
                 template: str = LEGACY_TEMPLATE):
        super().__init__()
        spec = _spec(backbone)
        size = get_template(template).size
        self.config = {"backbone": backbone, "embedding_dim": int(embedding_dim),
                       "dropout": float(dropout), "template": template, "image_size": size,
                       "input": f"RGB, B x 3 x {size} x {size}, (x/255 - 0.5)/0.5"}
        self.trunk = Trunk(spec.build(weights=None), spec.drop_maxpool)
        self.head = EmbeddingHead(spec.channels, feature_map_size(backbone, size), embedding_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision caches the ImageNet weights of this backbone (torch.hub's checkpoints dir)."""
    url = _spec(backbone).weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_imagenet_weights(net: EmbeddingNet, path: str | Path | None = None) -> EmbeddingNet:
    """Copy torchvision ImageNet weights into the trunk (fc is dropped: the head is new).

    Reads ``path`` if given, else torch.hub's cache, else downloads into that cache. Offline with no
    file gives one error that says which file to fetch and where to put it.
    """
    backbone = net.config["backbone"]
    url = _spec(backbone).weights.url
    file = Path(path) if path else imagenet_weights_file(backbone)
    if path and not file.is_file():
        raise PretrainedWeightsError(f"train.pretrained_path: {file} does not exist")
    if not file.is_file():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(file.name)  # torchvision names carry a sha256 prefix
            torch.hub.download_url_to_file(url, str(file), hash_prefix=digest.group(1) if digest else None,
                                           progress=True)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "no download"
            raise PretrainedWeightsError(
                f"train.pretrained=imagenet: no weights file at {file} and the download of {url} "
                f"failed ({type(err).__name__}: {err}). Download that file on a machine with "
                f"network and set train.pretrained_path to it (or place it at {file}), or use "
                f"train.pretrained: none") from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.trunk.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise PretrainedWeightsError(f"{file}: does not match {backbone} (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")
    return net


def build_embedding_net(backbone: str, embedding_dim: int | None = None, dropout: float = 0.0,
                        pretrained: str = "none", pretrained_path: str | None = None,
                        template: str = LEGACY_TEMPLATE) -> nn.Module:
    """The network for crops on ``template``, with ImageNet weights in a torchvision trunk or
    dlib's weights in dlib_resnet."""
    allowed = PRETRAINED_FOR_BACKBONE.get(backbone)
    if allowed is None:
        raise ValueError(f"unknown backbone {backbone!r}; known: {list(BACKBONE_NAMES)}")
    if pretrained not in allowed:
        raise ValueError(f"train.pretrained={pretrained!r} does not fit train.backbone={backbone!r}; "
                         f"allowed: {list(allowed)}")
    net = make_net(backbone, embedding_dim, dropout, template)
    if pretrained == "imagenet":
        load_imagenet_weights(net, pretrained_path)
    elif pretrained == "dlib":
        net.load_dat(pretrained_path)
    return net


def load_embedding_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the embedding network from a models/model.pt checkpoint, in eval mode.

    Input B x 3 x S x S RGB in [-1, 1], crops on ``config["template"]``; output B x D embeddings
    (compare by cosine).
    """
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a model checkpoint (expected keys 'model' and 'config')")
    cfg = ckpt["config"]
    net = make_net(cfg["backbone"], cfg["embedding_dim"], cfg.get("dropout", 0.0),
                   cfg.get("template", LEGACY_TEMPLATE))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval()


def interpolate_weights(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """The weight-space ensemble of a fine-tuned network and its start (WiSE-FT, Wortsman et al.,
    CVPR 2022): start + alpha x (end - start), per floating-point tensor (others are taken from
    ``end``). Fine-tuning from a pretrained start stays in one basin, so the line between the two
    keeps most of what fine-tuning gained while giving back part of what it forgot; alpha 1 is the
    fine-tuned network, 0 the start."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation weight must lie in [0, 1], got {alpha}")
    if start.keys() != end.keys():
        raise ValueError(f"start and fine-tuned weights differ in names: {sorted(start.keys() ^ end.keys())[:3]}")
    out = {}
    for k, v in end.items():
        s = start[k].to(v.device)
        if s.shape != v.shape:
            raise ValueError(f"{k}: start {tuple(s.shape)} vs fine-tuned {tuple(v.shape)}")
        out[k] = torch.lerp(s.to(v.dtype), v, alpha) if v.is_floating_point() else v.clone()
    return out
