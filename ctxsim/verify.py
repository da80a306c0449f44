"""Verification of what a folder records about itself (``ctxsim verify``): the checks readers run, as a report.

A :class:`VerifyReport` is a list of :class:`Check` rows, one per recorded hash, fingerprint or verdict: "ok" (bound
and consistent), "FAIL" (not: the row names the file and why) or "-" (nothing recorded to check, e.g. a run folder
of an older ctxsim without a weights sha256: no verdict, and no failure either). This module checks run folders
(:func:`verify_run`); ``ctxsim.export.verify`` checks export folders and ``ctxsim.deploy.verify`` index folders and
dispatches by folder kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "VerifyReport", "verify_run"]

OK, FAIL, NONE = "ok", "FAIL", "-"


@dataclass
class Check:
    """One verified record: ``item`` (a file or folder), what was checked, its status and a one-line detail."""

    item: str
    check: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"item": self.item, "check": self.check, "status": self.status, "detail": self.detail}


@dataclass
class VerifyReport:
    """The checks of one folder (``kind``: "run", "export" or "index"); ``ok`` when none failed."""

    path: str
    kind: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


def verify_run(run_dir: str | Path, label: str | None = None) -> list[Check]:
    """Check a run folder: model.json readable; model.safetensors readable, equal to the sha256 model.json records
    (when it records one), its tensors' fingerprint equal to model.json's (and to the one in its own header), and
    of the architecture model.json describes; ``checkpoints/last.safetensors`` intact (its own sha256); eval.json
    about this model. ``label`` prefixes the item names (default: the folder's path)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ctxsim.errors import CtxsimError
    from ctxsim.io import read_json, sha256_file
    from ctxsim.nets.card import CARD, WEIGHTS, fingerprint, read_card
    from ctxsim.nets.embedding import EmbeddingNet, ModelSpec

    run_dir = Path(run_dir)
    at = (label if label is not None else str(run_dir)).rstrip("/")

    def name(rel: str) -> str:
        return f"{at}/{rel}" if at else rel

    checks: list[Check] = []
    try:
        card = read_card(run_dir)
    except CtxsimError as e:
        return [Check(name(CARD), "readable model card", FAIL, str(e))]
    checks.append(Check(name(CARD), "readable model card", OK, f"model {card.fingerprint or '?'}"))
    if not card.fingerprint:
        checks.append(Check(name(CARD), "records a fingerprint", FAIL, "no fingerprint: nothing binds the weights"))
    weights = run_dir / WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        return checks + [Check(name(WEIGHTS), "present", FAIL, "missing")]
    except Exception as e:  # noqa: BLE001 - any decode failure: damaged
        return checks + [Check(name(WEIGHTS), "readable safetensors", FAIL, f"unreadable ({str(e)[:80]})")]
    if card.weights_sha256:
        same = sha256_file(weights) == card.weights_sha256
        checks.append(Check(name(WEIGHTS), f"sha256 recorded in {CARD}", OK if same else FAIL,
                            card.weights_sha256[:16] if same else "differs: damaged or replaced since training"))
    else:
        checks.append(Check(name(WEIGHTS), f"sha256 recorded in {CARD}", NONE,
                            "no hash recorded (older ctxsim); the fingerprint check covers the tensors"))
    if card.fingerprint:
        got = fingerprint(state, card.preprocess)
        checks.append(Check(name(WEIGHTS), f"fingerprint recorded in {CARD}", OK if got == card.fingerprint else FAIL,
                            card.fingerprint if got == card.fingerprint else
                            f"the tensors are model {got}, {CARD} says {card.fingerprint}"))
        try:
            with safe_open(str(weights), "pt") as f:
                header_fp = (f.metadata() or {}).get("fingerprint")
        except Exception:  # noqa: BLE001 - already loaded above; a header without metadata is fine
            header_fp = None
        if header_fp is not None and header_fp != card.fingerprint:
            checks.append(Check(name(WEIGHTS), "fingerprint in its header", FAIL,
                                f"header says {header_fp}, {CARD} says {card.fingerprint}"))
    try:
        model = EmbeddingNet(ModelSpec.from_dict({**card.arch.to_dict(), "pretrained": None}))
        model.load_state_dict(state, strict=True)
        checks.append(Check(name(WEIGHTS), f"architecture in {CARD}", OK, card.arch.backbone))
    except (RuntimeError, CtxsimError) as e:
        checks.append(Check(name(WEIGHTS), f"architecture in {CARD}", FAIL, str(e).splitlines()[0][:120]))
    checks.extend(_checkpoint_checks(run_dir, name))
    eval_json = run_dir / "eval.json"
    if eval_json.is_file():
        try:
            eval_fp = read_json(eval_json).get("fingerprint")
        except (CtxsimError, AttributeError):
            eval_fp = "unreadable"
        good = eval_fp == card.fingerprint
        checks.append(Check(name("eval.json"), "metrics are of this model", OK if good else FAIL,
                            "" if good else f"computed on model {eval_fp}; re-run `ctxsim eval`"))
    return checks


def _checkpoint_checks(run_dir: Path, name: Any) -> list[Check]:
    last = run_dir / "checkpoints" / "last.safetensors"
    if not last.is_file():
        return []
    try:
        from ctxsim.train import read_checkpoint
    except ImportError:  # pragma: no cover - an install without the trainer
        return [Check(name("checkpoints/last.safetensors"), "intact", NONE, "cannot be read here")]
    from ctxsim.errors import CtxsimError

    try:
        ck = read_checkpoint(run_dir)
    except CtxsimError as e:
        return [Check(name("checkpoints/last.safetensors"), "intact (its own sha256)", FAIL, str(e))]
    return [Check(name("checkpoints/last.safetensors"), "intact (its own sha256)",
                  NONE if getattr(ck, "legacy", False) else OK,
                  f"epoch {ck.epoch}" + (" (old layout: no hash to check)" if getattr(ck, "legacy", False) else ""))]
