"""Embedders on real aligned LFW crops: dlib's reference network and a (tiny, untrained) model."""
from __future__ import annotations

import cv2
import dlib
import numpy as np
import pytest
import torch

from pipeline.align.detection import align_standalone
from pipeline.align.geometry import DLIB_150
from pipeline.dlib_models import dlib_models_dir
from pipeline.recognition.embedders import DlibEmbedder, DlibLibraryEmbedder, TorchEmbedder, make_embedder
from pipeline.recognition.models import EmbeddingNet
from tests.conftest import lfw_root

FACES = ["George_W_Bush/George_W_Bush_0001", "George_W_Bush/George_W_Bush_0002",
         "Colin_Powell/Colin_Powell_0001", "Colin_Powell/Colin_Powell_0002"]


def _image(image_id: str) -> np.ndarray:
    bgr = cv2.imread(str(lfw_root() / "lfw-deepfunneled" / f"{image_id}.jpg"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    out = [align_standalone(_image(i)).crop for i in FACES]
    assert all(c is not None for c in out)
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", 32).eval()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {"epoch": 0}}, path)
    return path


def test_dlib_reference_tells_people_apart(crops):
    e = DlibEmbedder(template="arcface112").embed(crops)
    assert e.shape == (4, 128) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    sim = e @ e.T
    same = min(sim[0, 1], sim[2, 3])
    different = max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
    assert same > different + 0.05


@pytest.mark.parametrize("template", ["arcface112", "dlib150"])
def test_dlib_on_our_crop_matches_dlib_on_its_own_chip(crops, template):
    """Our ArcFace crop resampled to dlib's chip layout, or our dlib150 crop (the chip, aligned
    from the photo), gives (nearly) dlib's own descriptor."""
    emb = DlibEmbedder(template=template)
    if template == "dlib150":
        crops = np.stack([align_standalone(_image(i), template=DLIB_150).crop for i in FACES[:2]])
        assert crops.shape == (2, 150, 150, 3) and emb.template is DLIB_150
    ours = emb.embed(crops[:2])
    folder = dlib_models_dir()
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
    for k, image_id in enumerate(FACES[:2]):
        img = _image(image_id)
        native = np.array(DlibLibraryEmbedder().net.compute_face_descriptor(img, sp(img, det(img, 1)[0])))
        assert ours[k] @ (native / np.linalg.norm(native)) > 0.97


def test_flip_averaging_is_the_normalised_sum(crops):
    emb = DlibEmbedder(template="arcface112")
    plain, mirrored = emb.embed(crops[:1]), emb.embed(np.ascontiguousarray(crops[:1, :, ::-1]))
    both = emb.embed(crops[:1], flip=True)
    expected = (plain + mirrored) / np.linalg.norm(plain + mirrored)
    assert np.allclose(both, expected, atol=1e-5)


def test_trained_model_checkpoint_embeds_deterministically_in_any_batch_size(tiny_model, crops):
    emb = make_embedder(str(tiny_model))
    assert isinstance(emb, TorchEmbedder) and emb.dim == 32
    a = emb.embed(crops, batch_size=4)
    b = emb.embed(crops, batch_size=1)
    assert a.shape == (4, 32) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)


def test_bad_inputs_are_refused(tiny_model, tmp_path):
    emb = make_embedder(str(tiny_model))
    with pytest.raises(ValueError, match="uint8 RGB crops"):
        emb.embed(np.zeros((1, 100, 100, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="model not found"):
        make_embedder(str(tmp_path / "missing.pt"))
