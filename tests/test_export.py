"""The ONNX export (pipeline.recognition.export) and its runner (embedders.OnnxEmbedder) on real aligned LFW crops."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.align import geometry as geo
from pipeline.recognition.embedders import OnnxEmbedder, TorchEmbedder, make_embedder
from pipeline.recognition.export import MIN_COSINE, ExportError, export_onnx, validation_crops
from pipeline.data.images import decode_rgb
from pipeline.recognition.models import EmbeddingNet, build_embedding_net
from pipeline.data.tar_chunks import file_sha256, list_chunks, read_chunk


def _save(net, path):
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, path)
    return path


@pytest.fixture(scope="module")
def crops(tiny_shards) -> np.ndarray:
    """Both twins of every aligned TEST image of the tiny real pipeline (dlib150 crops)."""
    aligned = tiny_shards.parent / "aligned" / "chunks"
    out = [decode_rgb(m[k]) for c in list_chunks(aligned, prefix="test-") for _, m in read_chunk(c)
           for k in ("raw.jpg", "masked.jpg")]
    assert len(out) >= 40 and out[0].shape == (150, 150, 3)
    return np.stack(out)


@pytest.fixture(scope="module")
def dlib_model(tmp_path_factory):
    """The CPU default's network as it starts (dlib's weights in the torch port) as a checkpoint."""
    net = build_embedding_net("dlib_resnet", pretrained="dlib", template="dlib150").eval()
    return _save(net, tmp_path_factory.mktemp("dlib_model") / "model.pt")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # both L2-normalised by Embedder.embed


def test_onnx_embeds_every_real_crop_as_the_checkpoint(dlib_model, crops, tmp_path):
    """Cosine >= 0.9999 to the torch embedding on every crop (raw and masked twins), at any batch
    size and thread count; the metadata says how to feed it; the same bytes on a second export."""
    out = tmp_path / "model.onnx"
    report = export_onnx(model_path=dlib_model, out_path=out, check_crops=crops[:16])
    assert report["check"]["crops"] == 16 and report["check"]["min_cosine"] >= MIN_COSINE
    torch_emb = TorchEmbedder(dlib_model).embed(crops)
    onnx = make_embedder(str(out))
    assert isinstance(onnx, OnnxEmbedder) and onnx.template is geo.DLIB_150 and onnx.dim == 128
    for e in (onnx.embed(crops), onnx.embed(crops, batch_size=7), OnnxEmbedder(out, threads=1).embed(crops)):
        assert _cosines(torch_emb, e).min() >= MIN_COSINE
    meta = onnx.metadata
    assert meta["source_sha256"] == file_sha256(dlib_model) and meta["flip"] == "false"
    assert meta["input"].startswith("NCHW float32, RGB") and meta["crop_size"] == "150"
    points = np.array([[float(v) for v in p.split(",")] for p in meta["template_points"].split(";")])
    assert np.allclose(points, geo.DLIB_150.points, atol=1e-4)
    again = tmp_path / "again.onnx"
    export_onnx(model_path=dlib_model, out_path=again)
    assert again.read_bytes() == out.read_bytes()


def test_a_torchvision_backbone_on_arcface_crops(crops, tmp_path):
    """The GPU path's ResNet18 (arcface112 crops) exports as well: same check on the same people's
    crops mapped onto the 112 px template."""
    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", 64, template="arcface112").eval()
    model = _save(net, tmp_path / "model.pt")
    m = geo.crop_to_crop_matrix(geo.DLIB_150, geo.ARCFACE_112)
    small = np.stack([cv2.warpAffine(c, m, (112, 112), flags=cv2.INTER_LINEAR) for c in crops])
    export_onnx(model_path=model, out_path=tmp_path / "m.onnx", check_crops=small)
    onnx = OnnxEmbedder(tmp_path / "m.onnx")
    assert onnx.template is geo.ARCFACE_112 and onnx.dim == 64
    assert _cosines(TorchEmbedder(model).embed(small), onnx.embed(small)).min() >= MIN_COSINE


def test_a_failed_check_writes_no_file_and_bad_files_are_refused(dlib_model, crops, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="cosine"):
        export_onnx(model_path=dlib_model, out_path=out, check_crops=crops[:4], min_cosine=1.5)
    assert not out.exists() and not list(tmp_path.iterdir())
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not an ONNX model"):
        OnnxEmbedder(tmp_path / "junk.onnx")
    # a graph without the metadata (e.g. exported by hand) is refused: its preprocessing is unknown
    import onnx

    export_onnx(model_path=dlib_model, out_path=out)
    graph = onnx.load(str(out))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="ONNX metadata lacks"):
        OnnxEmbedder(tmp_path / "bare.onnx")


def test_validation_crops_are_the_val_shards_twins(tiny_shards):
    got = validation_crops(tiny_shards, 5)
    first = next(m for s in list_chunks(tiny_shards, "val-") for _, m in read_chunk(s))
    assert got.shape == (5, 150, 150, 3)
    assert np.array_equal(got[0], decode_rgb(first["raw.jpg"])) and np.array_equal(got[1], decode_rgb(first["masked.jpg"]))
    assert validation_crops(tiny_shards, 0) is None
