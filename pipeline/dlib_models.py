"""Where dlib's model files live: the face-recognition-models package (public wheels, no download).

Located with importlib instead of importing the package, whose __init__ needs pkg_resources.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
FACE_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"
# sha256 of the face ResNet as shipped by face-recognition-models 0.3.0 (the pretrained start of
# the default fine-tuning: the package pin plus this hash pin the weights DVC cannot track)
FACE_RESNET_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"


def dlib_models_dir() -> Path:
    """The ``models`` folder of face-recognition-models; a clear error when it is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed "
                                "(pip install face-recognition-models==0.3.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"
