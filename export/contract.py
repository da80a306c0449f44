"""The preprocessing contract of an exported model: what it is, how it is stored, and how to apply it to images.

A contract is a JSON-ready dict built from the run's model card at export time, stored in the ONNX file's
``metadata_props`` (and an engine's sidecar, and ``manifest.json``) and read back by the runners: input/output
names, ``input_format`` ("float_nchw": the caller normalises; "uint8_nhwc": normalisation in the graph), dtype,
layout and shape (-1: the dynamic batch), input/resize size, channels, mean/std, interpolation, "l2_normalized"
output, embedding_dim, fingerprint, precision. API: ``build_contract``, ``contract_to_metadata`` /
``contract_from_metadata``, ``check_batch``, ``preprocess_batch``: exactly ``ctxsim.data.transforms.
eval_transform`` for float_nchw and only its resize/center-crop for uint8_nhwc, so the two cannot drift. The keys
one by one: docs/CONTRACTS.md and docs/EXPORT.md.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError

__all__ = ["CONTRACT_VERSION", "INPUT_FORMATS", "INPUT_NAME", "METADATA_KEY", "METADATA_PREFIX", "OUTPUT_NAME",
           "PRECISIONS", "RESIZE_RULE", "build_contract", "check_batch", "check_input_format", "contract_from_metadata",
           "contract_preprocess", "contract_to_metadata", "preprocess_batch"]

CONTRACT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
INPUT_FORMATS = ("float_nchw", "uint8_nhwc")
PRECISIONS = ("fp32", "fp16", "int8")
RESIZE_RULE = "shorter_side_then_center_crop"
#: ONNX metadata_props key holding the whole contract as JSON; individual keys are also stored as "ctxsim.<key>"
METADATA_KEY = "ctxsim.contract"
METADATA_PREFIX = "ctxsim."
_PREPROCESS_KEYS = ("input_size", "resize_size", "mean", "std", "channels", "interpolation")


def check_input_format(input_format: str) -> str:
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    return input_format


def build_contract(card, input_format: str = "float_nchw", precision: str = "fp32") -> dict[str, Any]:
    """The contract of a model card (``ctxsim.nets.ModelCard``) exported with ``input_format`` at ``precision``."""
    check_input_format(input_format)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    p = card.preprocess
    c, s = p.num_channels, p.input_size
    uint8 = input_format == "uint8_nhwc"
    return {
        "contract_version": CONTRACT_VERSION,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_format": input_format,
        "input_dtype": "uint8" if uint8 else "float32",
        "layout": "NHWC" if uint8 else "NCHW",
        "input_shape": [-1, s, s, c] if uint8 else [-1, c, s, s],
        "input_size": p.input_size,
        "resize_size": p.resize_size,
        "channels": p.channels,
        "num_channels": c,
        "mean": list(p.mean),
        "std": list(p.std),
        "interpolation": p.interpolation,
        "resize": RESIZE_RULE,
        "normalization": "in_graph" if uint8 else "caller",
        "output": "l2_normalized",
        "embedding_dim": int(card.embedding_dim),
        "fingerprint": card.fingerprint,
        "ctxsim_version": card.ctxsim_version,
        "precision": precision,
    }


def contract_preprocess(contract: Mapping[str, Any]):
    """The ``ctxsim.data.transforms.Preprocess`` recorded in a contract."""
    from ctxsim.data.transforms import Preprocess

    try:  # channels and interpolation have defaults; the sizes, mean and std are required
        return Preprocess.from_dict({k: contract[k] for k in _PREPROCESS_KEYS if k in contract})
    except ConfigError as e:
        raise ArtifactError(f"the model's preprocessing contract is unusable ({e}); re-export the model") from None


# ---------------------------------------------------------------------------------------------- ONNX metadata
def contract_to_metadata(contract: Mapping[str, Any]) -> dict[str, str]:
    """String key/value pairs for ONNX ``metadata_props``: the whole contract plus one readable entry per key."""
    meta = {METADATA_KEY: json.dumps(dict(contract), sort_keys=True)}
    for k, v in contract.items():
        meta[METADATA_PREFIX + k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def contract_from_metadata(meta: Mapping[str, str], where: str = "the model") -> dict[str, Any]:
    """Inverse of :func:`contract_to_metadata`; ArtifactError if ``meta`` has no ctxsim contract."""
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"{where} has no ctxsim metadata (not exported by ctxsim); "
                            "export the run with `ctxsim export RUN_DIR`")
    try:
        contract = json.loads(raw)
    except json.JSONDecodeError:
        raise ArtifactError(f"{where} has unreadable ctxsim metadata; re-export it with `ctxsim export`") from None
    if not isinstance(contract, dict) or contract.get("contract_version") != CONTRACT_VERSION:
        raise ArtifactError(f"{where} has a ctxsim contract of an unknown version; re-export it with this ctxsim")
    return contract


# ---------------------------------------------------------------------------------------------- preprocessing
@functools.lru_cache(maxsize=16)
def _split_eval_transform(preprocess) -> tuple[tuple, tuple]:
    """The eval transform's steps, split into the PIL steps (convert, resize, crop) and the tensor steps; built
    once per contract (``Preprocess`` is frozen and hashable), not on every served batch."""
    from torchvision import transforms as T

    from ctxsim.data.transforms import eval_transform

    steps = list(eval_transform(preprocess).transforms)
    for i, step in enumerate(steps):
        if isinstance(step, (T.ToTensor, T.PILToTensor)) or type(step).__name__ in ("ToImage", "ToTensor"):
            return tuple(steps[:i]), tuple(steps[i:])
    raise ArtifactError("ctxsim.data.transforms.eval_transform has no ToTensor step; "
                        "export.contract cannot split it for uint8 input")  # pragma: no cover - guards a refactor


def preprocess_batch(images: Sequence, contract: Mapping[str, Any]) -> np.ndarray:
    """PIL images -> the model input of ``contract``: float32 [N, C, H, W] (the eval transform, normalised)
    for ``float_nchw``; uint8 [N, H, W, C] (converted, resized, center-cropped; not normalised) for ``uint8_nhwc``."""
    import torch
    from torchvision import transforms as T

    fmt = check_input_format(contract.get("input_format", "float_nchw"))
    preprocess = contract_preprocess(contract)
    if len(images) == 0:
        s, c = preprocess.input_size, preprocess.num_channels
        return np.zeros((0, c, s, s) if fmt == "float_nchw" else (0, s, s, c),
                        np.float32 if fmt == "float_nchw" else np.uint8)
    pil_steps, tensor_steps = _split_eval_transform(preprocess)
    if fmt == "float_nchw":
        full = T.Compose([*pil_steps, *tensor_steps])
        return torch.stack([full(img) for img in images]).numpy().astype(np.float32, copy=False)
    crop = T.Compose(list(pil_steps))
    out = []
    for img in images:
        a = np.asarray(crop(img), dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return np.ascontiguousarray(np.stack(out))


def check_batch(batch: np.ndarray, contract: Mapping[str, Any], who: str = "model") -> np.ndarray:
    """Validate a batch against the contract's input (dtype, rank, non-batch dims); returns it contiguous."""
    if not isinstance(batch, np.ndarray):
        raise ConfigError(f"{who} takes a numpy array, got {type(batch).__name__}")
    want = np.dtype(contract["input_dtype"])
    shape = list(contract["input_shape"])
    if batch.ndim != len(shape) or list(batch.shape[1:]) != shape[1:]:
        raise ConfigError(f"{who} expects {contract['input_format']} input of shape "
                          f"[N, {', '.join(map(str, shape[1:]))}], got {list(batch.shape)}; "
                          "preprocess with ctxsim.export.contract.preprocess_batch")
    if batch.dtype != want:
        if want == np.uint8 or batch.dtype.kind != "f":
            raise ConfigError(f"{who} expects {want} input, got {batch.dtype}; "
                              "preprocess with ctxsim.export.contract.preprocess_batch")
        batch = batch.astype(want)
    return np.ascontiguousarray(batch)
