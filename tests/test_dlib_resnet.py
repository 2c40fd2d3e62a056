"""dlib's face ResNet in torch: the .dat reader, the architecture's odd corners, and the match with
dlib itself on real LFW face chips."""
from __future__ import annotations

import dlib
import numpy as np
import pytest
import torch

from pipeline.dlib_models import FACE_RESNET, FACE_RESNET_SHA256, SHAPE_68, dlib_models_dir
from pipeline.recognition.dlib_resnet import (DlibEmbeddingNet, DlibFaceResNet, add_zero_extended, load_dlib_resnet,
                                              read_dat, state_dict_from_dat)
from pipeline.recognition.dlib_serialization import DlibFormatError, DlibReader
from pipeline.recognition.embedders import DlibEmbedder, DlibLibraryEmbedder
from pipeline.data.images import decode_rgb
from tests.conftest import lfw_root

DAT = dlib_models_dir() / FACE_RESNET


@pytest.fixture(scope="module")
def port() -> DlibFaceResNet:
    return load_dlib_resnet(DAT)


@pytest.fixture(scope="module")
def face_chips() -> np.ndarray:
    """dlib's own chips (get_face_chip, 150 px, padding 0.25) of 24 real LFW photos of 24 people."""
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_68))
    chips = []
    for person in sorted((lfw_root() / "lfw-deepfunneled").iterdir())[::40]:
        img = decode_rgb((sorted(person.glob("*.jpg"))[0]).read_bytes())
        found = det(img, 0)
        if found:
            chips.append(dlib.get_face_chip(img, sp(img, found[0]), size=150, padding=0.25))
        if len(chips) == 24:
            break
    assert len(chips) == 24
    return np.stack(chips)


def test_port_matches_dlib_to_1e5_on_real_face_chips(port, face_chips):
    net = dlib.face_recognition_model_v1(str(DAT))
    ref = np.array(net.compute_face_descriptor(list(face_chips)), dtype=np.float32)
    with torch.no_grad():
        out = port(torch.from_numpy(face_chips).permute(0, 3, 1, 2).float()).numpy()
    assert out.shape == (24, 128)
    assert np.abs(out - ref).max() < 1e-5
    assert np.abs(np.linalg.norm(out, axis=1) - 1).max() > 1e-3  # dlib does not normalise: neither do we


def test_the_file_holds_anet_type(port):
    chain, inp = read_dat(DAT)
    kinds = [layer.kind for layer in chain]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    assert inp["size"] == (150, 150)
    assert np.allclose(inp["mean"], (122.782, 117.001, 104.298), atol=1e-3)
    assert next(layer for layer in chain if layer.kind == "loss").data["dist_thresh"] == pytest.approx(0.6)
    n = sum(p.numel() for p in port.parameters())
    assert 5.5e6 < n < 5.7e6


def test_down_blocks_have_unpadded_stride_two_and_a_larger_skip_at_the_end(port):
    """Feature maps 150 -> 72 (7x7/2, no pad) -> 35 (3x3/2 pool) -> 17 -> 8 -> 3 main / 4 skip ->
    1 main / 2 skip: add_prev zero-extends the main branch to the skip's size."""
    sizes = []
    hooks = [b.conv1.register_forward_hook(lambda m, i, o: sizes.append((i[0].shape[-1], o.shape[-1])))
             for b in port.blocks if b.down]
    with torch.no_grad():
        port(torch.full((1, 3, 150, 150), 128.0))
    for h in hooks:
        h.remove()
    assert sizes == [(35, 17), (17, 8), (8, 3), (4, 1)]


def test_add_prev_zero_extends_top_left():
    a = torch.ones(1, 2, 1, 1)
    b = torch.full((1, 3, 2, 2), 10.0)
    out = add_zero_extended(a, b)
    assert out.shape == (1, 3, 2, 2)
    assert out[0, :2, 0, 0].tolist() == [11.0, 11.0] and out[0, 2, 0, 0] == 10.0 and out[0, 0, 1, 1] == 10.0


@pytest.mark.parametrize("data, value", [(b"\x01\x00", 0), (b"\x01\x05", 5), (b"\x82\x2c\x01", -300),
                                         (b"\x04\x00\x00\x00\x80", 2 ** 31)])
def test_integers_are_a_control_byte_then_little_endian_magnitude(data, value):
    assert DlibReader(data).int() == value


def test_floats_are_mantissa_then_exponent():
    # 0.75 = 3 * 2^-2; -1.5 = -3 * 2^-1; exponent 32000 = +inf
    assert DlibReader(b"\x01\x03\x81\x02").float() == 0.75
    assert DlibReader(b"\x81\x03\x81\x01").float() == -1.5
    assert DlibReader(b"\x01\x00\x02\x00\x7d").float() == float("inf")


def test_strings_bools_and_tensors():
    r = DlibReader(b"\x01\x03abc" + b"1" + b"\x01\x02" + b"\x01\x01\x01\x02\x01\x01\x01\x01"
                   + np.array([1.5, -2.0], "<f4").tobytes())
    assert r.str() == "abc" and r.bool() is True
    t = r.tensor()
    assert t.shape == (1, 2, 1, 1) and t.ravel().tolist() == [1.5, -2.0] and r.at_end()


def test_damaged_files_fail_with_the_place(tmp_path):
    data = DAT.read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DlibFormatError, match="truncated"):
        read_dat(cut)
    extra = tmp_path / "extra.dat"
    extra.write_bytes(data + b"\x00")
    with pytest.raises(DlibFormatError, match="1 bytes left"):
        read_dat(extra)
    other = tmp_path / "other.dat"  # the 68-point shape predictor is not a network
    other.write_bytes((dlib_models_dir() / SHAPE_68).read_bytes()[:4096])
    with pytest.raises(DlibFormatError, match="layer 0"):
        read_dat(other)


def test_state_dict_fills_every_parameter_of_the_module():
    state = state_dict_from_dat(DAT)
    assert set(state) == set(DlibFaceResNet().state_dict())


def test_reference_through_the_port_gives_dlibs_numbers_on_our_crops(face_chips):
    """Our 112 crops -> chips in-network (torch) vs cv2.warpAffine + dlib itself: the same chips bit
    for bit, the same embeddings to float rounding."""
    crops = np.stack([np.ascontiguousarray(c[19:131, 19:131]) for c in face_chips[:8]])  # any 112 images
    library = DlibLibraryEmbedder(template="arcface112")
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    chips = DlibEmbeddingNet().to_chips(x).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(chips, np.stack([library.to_chip(c) for c in crops]).astype(np.float32))
    port = DlibEmbedder(template="arcface112").embed(crops)
    assert np.abs(port - library.embed(crops)).max() < 1e-5


def test_dlib150_crops_are_the_chip_itself(face_chips):
    """On ``dlib150`` crops (dlib's own chips here) nothing is resampled: port == dlib."""
    chips = np.stack(face_chips[:8])
    port, library = DlibEmbedder(), DlibLibraryEmbedder()
    assert port.template.size == library.template.size == 150
    assert np.abs(port.embed(chips) - library.embed(chips)).max() < 1e-5


def test_embedding_net_interface_and_gradients():
    net = DlibEmbeddingNet().load_dat(DAT)
    assert net.config["backbone"] == "dlib_resnet" and net.config["embedding_dim"] == 128
    x = torch.zeros(2, 3, 112, 112, requires_grad=False)
    out = net(x)
    out.sum().backward()
    assert out.shape == (2, 128) and net.net.conv1.weight.grad is not None
    with pytest.raises(ValueError, match="128"):
        DlibEmbeddingNet(embedding_dim=512)


def test_the_shipped_file_is_checked_by_hash(tmp_path):
    with pytest.raises(DlibFormatError, match="sha256"):
        read_dat(DAT, sha256="0" * 64)
    chain, _ = read_dat(DAT, sha256=FACE_RESNET_SHA256)
    assert chain[0].kind == "loss"
