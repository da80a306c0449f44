"""Helpers for the export and deploy tests: run folders made without training (seeded random weights), the
shipped Omniglot sample as their data, and a weight-perturbed copy of an ONNX file.

Importable as ``export_helpers`` from every test folder (tests/ is on sys.path through tests/conftest.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ctxsim.config import resolve_config
from ctxsim.data.transforms import Preprocess
from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

FAMILIES = {
    "convnet": (dict(backbone="convnet", in_channels=1), Preprocess.greyscale(28, 28)),
    "resnet18": (dict(backbone="resnet18", pretrained=None), Preprocess.imagenet(64, 64)),
    "mobilenet_v3_small": (dict(backbone="mobilenet_v3_small", pretrained=None), Preprocess.imagenet(64, 64)),
    "efficientnet_b0": (dict(backbone="efficientnet_b0", pretrained=None), Preprocess.imagenet(64, 64)),
}


def make_run(run_dir: Path, family: str = "convnet", data_root: str | Path | None = None, seed: int = 0,
             embedding_dim: int = 64) -> Path:
    """A run folder: model.safetensors + model.json (random weights seeded with ``seed``) and, with ``data_root``
    (e.g. the ``omniglot_dir`` fixture: the shipped sample), a config.yaml of the omniglot recipe reading it."""
    spec_kw, preprocess = FAMILIES[family]
    spec = ModelSpec(embedding_dim=embedding_dim, pooling="max", frozen_bn=False, **spec_kw)
    torch.manual_seed(seed)
    model = EmbeddingNet(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir, model, preprocess)
    if data_root is not None:
        cfg = resolve_config("omniglot", overrides={"data": {"root": str(data_root)}, "model": spec.to_dict(),
                                                    "preprocess": preprocess.to_dict()})
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def perturb_onnx(src: Path, dst: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """Copy an ONNX file with Gaussian noise (scale x each tensor's std) on its float weights, metadata kept."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype.kind == "f" and a.size > 1:
            noisy = a + rng.standard_normal(a.shape).astype(a.dtype) * (scale * float(a.std()) + 1e-6)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(a.dtype), init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))
    return dst
