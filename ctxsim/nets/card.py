"""The model card (model.json) and run-folder model I/O: weights in safetensors, architecture and preprocessing JSON."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ArtifactError, ConfigError
from ctxsim.io import atomic_write_json, atomic_write_safetensors, read_json, sha256_file
from ctxsim.nets.embedding import EmbeddingNet, ModelSpec
from ctxsim.schema import check_fields

__all__ = ["CARD", "WEIGHTS", "ModelCard", "check_weights", "fingerprint", "inference_state", "load_run", "read_card",
           "save_model"]

WEIGHTS = "model.safetensors"
CARD = "model.json"


@dataclass
class ModelCard:
    arch: ModelSpec
    preprocess: Preprocess
    fingerprint: str = ""
    ctxsim_version: str = ""
    weights_sha256: str = ""  # sha256 of model.safetensors ("" in run folders of older ctxsim versions)

    @property
    def embedding_dim(self) -> int:
        return self.arch.embedding_dim

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "preprocess": self.preprocess.to_dict(),
                "embedding_dim": self.embedding_dim, "fingerprint": self.fingerprint,
                "ctxsim_version": self.ctxsim_version,
                **({"weights_sha256": self.weights_sha256} if self.weights_sha256 else {})}

    @classmethod
    def from_dict(cls, d: Any, where: str = CARD) -> ModelCard:
        """Check ``d`` (model.json's content) field by field: ArtifactError (one line) naming the first problem."""
        hint = "restore the run folder from a copy or re-train"
        if not isinstance(d, dict):
            raise ArtifactError(f"{where} is not a model card; {hint}")
        for key in ("arch", "preprocess"):
            if key not in d:
                raise ArtifactError(f"{where} lacks {key!r}; {hint}")
        try:
            return cls(**check_fields(cls, d, error=ArtifactError, where=where, hint=hint))
        except ConfigError as e:  # a value out of range (ModelSpec, Preprocess)
            raise ArtifactError(f"{where}: {e}; {hint}") from None


def fingerprint(state: dict[str, torch.Tensor], preprocess: Preprocess) -> str:
    """A short hash of the weights and the preprocessing contract: same model, same fingerprint."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(state[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def inference_state(model: EmbeddingNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(folder: str | Path, model: EmbeddingNet, preprocess: Preprocess, name: str = WEIGHTS) -> ModelCard:
    """Write weights (safetensors) and, for the main weights file, model.json; both atomically."""
    from ctxsim import __version__

    folder = Path(folder)
    state = inference_state(model)
    card = ModelCard(model.spec, preprocess, fingerprint(state, preprocess), __version__)
    atomic_write_safetensors(folder / name, state, {"fingerprint": card.fingerprint})
    if name == WEIGHTS:
        card.weights_sha256 = sha256_file(folder / name)  # model.json binds the exact bytes (see check_weights)
        atomic_write_json(folder / CARD, card.to_dict())
    return card


def read_card(run_dir: str | Path) -> ModelCard:
    run_dir = Path(run_dir)
    if not (run_dir / CARD).exists():
        raise ArtifactError(f"{run_dir} is not a run folder (no {CARD}); train one with `ctxsim train`")
    return ModelCard.from_dict(read_json(run_dir / CARD), str(run_dir / CARD))


def check_weights(path: str | Path, card: ModelCard, state: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse weights that are not the bytes ``card`` (model.json) records: ArtifactError (one line) when the file's
    sha256 differs from ``card.weights_sha256`` (when recorded: run folders of older versions have none) or the
    fingerprint of its tensors (``state``, loaded from ``path`` when not given) differs from ``card.fingerprint``."""
    path = Path(path)
    if card.weights_sha256 and sha256_file(path) != card.weights_sha256:
        raise ArtifactError(f"{path} does not match the sha256 recorded in {CARD} (damaged or replaced); "
                            "restore the run folder from a copy or re-train")
    if card.fingerprint:
        got = fingerprint(load_file(str(path)) if state is None else state, card.preprocess)
        if got != card.fingerprint:
            raise ArtifactError(f"{path} holds model {got}, not model {card.fingerprint} that {CARD} records "
                                "(damaged or replaced); restore the run folder from a copy or re-train")


def load_run(run_dir: str | Path, weights: str = WEIGHTS) -> tuple[EmbeddingNet, ModelCard]:
    """Build the network recorded in ``run_dir/model.json`` and load its safetensors weights (eval mode, CPU).

    ``model.safetensors`` is checked against model.json first (:func:`check_weights`): damaged or replaced weights
    are refused with ArtifactError, never served."""
    run_dir = Path(run_dir)
    card = read_card(run_dir)
    spec = ModelSpec.from_dict({**card.arch.to_dict(), "pretrained": None})  # weights come from the file
    model = EmbeddingNet(spec)
    path = run_dir / weights
    if not path.exists():
        raise ArtifactError(f"{path} not found; the run has no weights yet")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises, the file is not readable weights
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); re-train or re-copy it") from None
    if weights == WEIGHTS:
        check_weights(path, card, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path} does not match the architecture in {CARD}: {str(e).splitlines()[0]}") from None
    model.spec = card.arch
    model.eval()
    return model, card
