"""Embedding network: shapes at 112 px, registry, ImageNet weights from a file or one clear error,
and the checkpoint round trip the evaluation stage relies on."""
from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

from pipeline.recognition.models import (BACKBONES, PretrainedWeightsError, build_embedding_net, feature_map_size,
                                         interpolate_weights, load_embedding_model)


def test_resnet18_maps_112px_faces_to_embeddings():
    net = build_embedding_net("resnet18", embedding_dim=64).eval()
    assert feature_map_size("resnet18", 112) == 4 and feature_map_size("resnet18_hr", 112) == 7
    out = net(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    assert net.config["image_size"] == 112 and net.config["backbone"] == "resnet18"
    assert net.config["template"] == "arcface112"


def test_the_crop_template_sets_the_input_size_and_survives_the_checkpoint(tmp_path):
    net = build_embedding_net("resnet18", embedding_dim=32, template="dlib150").eval()
    assert net.config["image_size"] == 150 and feature_map_size("resnet18", 150) == 5
    x = torch.rand(2, 3, 150, 150) * 2 - 1
    path = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, path)
    back = load_embedding_model(path)
    assert back.config["template"] == "dlib150"
    with torch.inference_mode():
        assert torch.equal(back(x), net(x))
    with pytest.raises(ValueError, match="arcface112"):
        build_embedding_net("resnet18", embedding_dim=32, template="dlib112")


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ValueError, match="resnet18"):
        build_embedding_net("vgg11", embedding_dim=64)
    assert "resnet18" in BACKBONES


def test_imagenet_weights_load_from_a_local_file(tmp_path):
    ref = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    net = build_embedding_net("resnet18", 32, pretrained="imagenet", pretrained_path=str(path))
    assert torch.equal(net.trunk.conv1.weight, ref.conv1.weight)
    assert torch.equal(net.trunk.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


def test_imagenet_offline_without_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(PretrainedWeightsError, match="pretrained_path"):
        build_embedding_net("resnet18", 32, pretrained="imagenet")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_embedding_net("resnet18", 32, pretrained="imagenet", pretrained_path=str(tmp_path / "no.pth"))


def test_checkpoint_round_trip_is_weights_only_and_eval_mode(tmp_path):
    torch.manual_seed(0)
    net = build_embedding_net("resnet18", 16, dropout=0.2)
    net.train()
    net(torch.randn(4, 3, 112, 112))  # move BN running stats away from their init
    net.eval()
    path = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "config": dict(net.config), "meta": {"epoch": 1}}, path)
    assert torch.load(path, weights_only=True)["config"]["embedding_dim"] == 16
    loaded = load_embedding_model(path)
    assert not loaded.training
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-6)
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a model checkpoint"):
        load_embedding_model(tmp_path / "bad.pt")


def test_registry_names_match_the_params_choices():
    from pipeline.config import BACKBONE_NAMES, TORCHVISION_BACKBONES

    assert set(BACKBONES) == set(TORCHVISION_BACKBONES) and "dlib_resnet" in BACKBONE_NAMES


def test_dlib_resnet_starts_from_dlibs_weights_and_round_trips(tmp_path):
    from pipeline.recognition.dlib_resnet import load_dlib_resnet

    net = build_embedding_net("dlib_resnet", pretrained="dlib").eval()
    assert net.config["embedding_dim"] == 128
    assert torch.equal(net.net.conv1.weight, load_dlib_resnet().conv1.weight)
    path = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "config": dict(net.config), "meta": {}}, path)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_embedding_model(path)(x), net(x))
    untrained = build_embedding_net("dlib_resnet")
    assert not torch.equal(untrained.net.conv1.weight, net.net.conv1.weight)


@pytest.mark.parametrize("backbone, pretrained", [("resnet18", "dlib"), ("dlib_resnet", "imagenet")])
def test_pretrained_weights_must_fit_the_backbone(backbone, pretrained):
    with pytest.raises(ValueError, match=r"train.pretrained=.*allowed"):
        build_embedding_net(backbone, pretrained=pretrained)


def test_weight_interpolation_runs_on_the_line_from_start_to_fine_tuned():
    start = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0]), "n": torch.tensor([3])}
    end = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0]), "n": torch.tensor([5])}
    mid = interpolate_weights(start, end, 0.7)
    assert torch.allclose(mid["w"], torch.tensor([0.7, 0.6])) and torch.equal(mid["b"], torch.tensor([1.0]))
    assert torch.equal(mid["n"], torch.tensor([5]))  # integer buffers (counters) come from the fine-tuned net
    assert all(torch.equal(interpolate_weights(start, end, 1.0)[k], end[k]) for k in end)
    assert all(torch.equal(interpolate_weights(start, end, 0.0)[k], start[k]) for k in ("w", "b"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_weights(start, end, 1.5)
    with pytest.raises(ValueError, match="differ in names"):
        interpolate_weights({"w": start["w"]}, end, 0.5)
    with pytest.raises(ValueError, match="w: start"):
        interpolate_weights({**start, "w": torch.zeros(3)}, end, 0.5)
