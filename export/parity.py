"""Parity of an exported artifact against the PyTorch fp32 reference: thresholds, the check, its report and verdicts.

API: ``check_parity`` / ``assert_parity`` (embed the run's evaluation images with both models and judge the
measures of ``ctxsim.export.parity_metrics`` against thresholds per precision, :data:`DEFAULT_THRESHOLDS`,
overridable with a dict or ``"key=value,..."``, ``none`` switching a check off), ``ParityReport``,
``write_parity`` / ``parity_record`` / ``recorded_verdict`` (``parity.json``, each verdict bound to the sha256 of
its bytes), ``raise_if_failed``, ``write_flips_grid``. The measures are re-exported here. The story, near-ties
included: docs/EXPORT.md, "Parity".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, FingerprintMismatch, ParityFailed
from ctxsim.export.parity_metrics import (
    cosine_rows,
    cross_recall_at_1,
    embedding_agreement,
    flip_examples,
    r1_flips,
    r1_margins,
    retrieval_agreement,
    topk_jaccard,
)
from ctxsim.io import atomic_write_json, sha256_file

if TYPE_CHECKING:
    import torch

    from ctxsim.data.datasets import ImageDataset
    from ctxsim.export.runners import Runner

__all__ = ["CHECKS", "DEFAULT_THRESHOLDS", "PARITY_FILE", "SETTINGS", "ParityReport", "assert_parity",
           "check_parity", "cosine_rows", "cross_recall_at_1", "embedding_agreement", "flip_examples",
           "parity_record", "parse_thresholds", "r1_flips", "r1_margins", "raise_if_failed", "recorded_verdict",
           "resolve_thresholds", "retrieval_agreement", "topk_jaccard", "write_flips_grid", "write_parity"]

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
#: check name -> (what it measures, direction): ">=": value must be at least the threshold; "<=": at most
CHECKS: dict[str, tuple[str, str]] = {
    "min_cosine": ("min cosine(reference, artifact)", ">="),
    "p1_cosine": ("1st-percentile cosine", ">="),
    "p50_cosine": ("median cosine", ">="),
    "max_norm_error": ("max |norm - 1| of artifact embeddings", "<="),
    "max_abs_delta_r1_points": ("|ΔR@1| (points)", "<="),
    "max_abs_delta_map_r_points": ("|ΔMAP@R| (points)", "<="),
    "min_topk_jaccard": ("mean top-k neighbour Jaccard", ">="),
    "max_abs_delta_cross_r1_points": ("|cross-model R@1 - reference R@1| (points)", "<="),
}
#: settings that tune a check rather than being one (also overridable through ``thresholds``)
SETTINGS: dict[str, str] = {
    "tie_margin": "reference decision margin under which an R@1 flip is a near-tie, left out of ΔR@1",
}
# tie_margin: fp32 graphs differ from PyTorch by ~1e-6 per embedding, fp16 ones by ~3e-3 (margins of a few 1e-4
# flip: see docs/EXPORT.md); int8 by ~1e-1.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.9999, "max_abs_delta_r1_points": 0.0, "max_norm_error": 1e-4, "tie_margin": 1e-5},
    "fp16": {"min_cosine": 0.999, "max_abs_delta_r1_points": 0.2, "max_norm_error": 1e-2, "tie_margin": 1e-3},
    "int8": {"p1_cosine": 0.98, "max_abs_delta_r1_points": 1.0, "max_norm_error": 1e-2, "tie_margin": 1e-2},
}
_EPS = 1e-9  # float slack on "<=" / ">=" comparisons of derived numbers


def parse_thresholds(spec: str | Mapping[str, Any] | None) -> dict[str, float | None]:
    """``"min_cosine=0.999,max_abs_delta_r1_points=0.5"`` (or a dict) -> {name: float or None (check off)}."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"thresholds are key=value pairs separated by commas, got {part!r}")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
    else:
        items = dict(spec)
    out: dict[str, float | None] = {}
    for k, v in items.items():
        if k not in CHECKS and k not in SETTINGS:
            raise ConfigError(f"unknown parity threshold {k!r}; known: {', '.join([*CHECKS, *SETTINGS])}")
        if v is None or (isinstance(v, str) and v.lower() in ("none", "off", "")):
            out[k] = 0.0 if k in SETTINGS else None  # no tie margin: every flip counts
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"parity threshold {k} must be a number or 'none', got {v!r}") from None
    return out


def resolve_thresholds(precision: str, overrides: str | Mapping[str, Any] | None = None) -> dict[str, float]:
    """The defaults for ``precision`` updated with ``overrides``; checks set to None are dropped."""
    if precision not in DEFAULT_THRESHOLDS:
        raise ConfigError(f"precision must be one of {', '.join(DEFAULT_THRESHOLDS)}, got {precision!r}")
    merged: dict[str, float | None] = {**DEFAULT_THRESHOLDS[precision], **parse_thresholds(overrides)}
    return {k: v for k, v in merged.items() if v is not None}


@dataclass
class ParityReport:
    """Result of :func:`check_parity`; ``passed`` is True when every threshold holds."""

    artifact: str
    runner: str
    precision: str
    fingerprint: str
    images: int
    classes: int
    thresholds: dict[str, float]
    embedding: dict[str, float]
    retrieval: dict[str, dict[str, Any]]
    neighbours: dict[str, float]
    cross: dict[str, float]
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    dataset: str = ""
    input_format: str = "float_nchw"
    seconds: float = 0.0
    sha256: str = ""  # of the artifact file the verdict was computed on ("" for a runner object)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        return _json_clean({
            "passed": self.passed, "failures": list(self.failures), "artifact": self.artifact,
            "runner": self.runner, "precision": self.precision, "reference": "pytorch-fp32",
            "fingerprint": self.fingerprint, "dataset": self.dataset, "images": self.images,
            "classes": self.classes, "input_format": self.input_format, "thresholds": dict(self.thresholds),
            "embedding": dict(self.embedding), "retrieval": {k: dict(v) for k, v in self.retrieval.items()},
            "neighbours": dict(self.neighbours), "cross": dict(self.cross), "checks": list(self.checks),
            "seconds": round(self.seconds, 2), "sha256": self.sha256,
        })


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------------------------------------- reporting
def write_flips_grid(examples: list[dict[str, Any]], dataset: ImageDataset, out_png: str | Path,
                     thumb: int = 96) -> Path:
    """One row per flipped query: the query, its top-1 under the reference, its top-1 under the artifact (framed
    green when of the query's class, red otherwise; captions: the similarities)."""
    import tempfile

    from ctxsim.grid import Neighbor, QueryResult, write_grid

    if not examples:
        raise ConfigError("no flipped queries to draw")
    with tempfile.TemporaryDirectory() as tmp:
        def saved(i: int) -> str:  # the split's images may live in a zip: write each one out once
            path = Path(tmp) / f"{i}.png"
            if not path.exists():
                dataset.load_image(i).save(path)
            return str(path)

        rows = [QueryResult(query=saved(e["query"]), label=str(e["label"]), neighbors=[
            Neighbor(1, e["reference_score"], e["reference_top1"], saved(e["reference_top1"]),
                     str(dataset.labels[e["reference_top1"]])),
            Neighbor(2, e["artifact_score"], e["artifact_top1"], saved(e["artifact_top1"]),
                     str(dataset.labels[e["artifact_top1"]]))]) for e in examples]
        write_grid(rows, out_png, thumb=thumb)
    return Path(out_png)


def _check(name: str, value: float | None, threshold: float) -> tuple[dict[str, Any], str | None]:
    what, op = CHECKS[name]
    if value is None or not math.isfinite(value):
        ok = False
    else:
        ok = value >= threshold - _EPS if op == ">=" else value <= threshold + _EPS
    row = {"check": name, "value": value, "op": op, "threshold": threshold, "passed": bool(ok)}
    msg = None if ok else f"{what} = {_fmt(value)}, needs {op} {_fmt(threshold)} ({name})"
    return row, msg


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.3g}"
    return f"{v:.6g}"


# ---------------------------------------------------------------------------------------------- the check
def _embed_both(model: torch.nn.Module, runner: Runner, dataset: ImageDataset, raw: ImageDataset,
                contract: Mapping[str, Any], batch_size: int, progress: Callable[[int, int], None] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from ctxsim.export.contract import preprocess_batch

    n = len(dataset)
    ref: list[np.ndarray] = []
    art: list[np.ndarray] = []
    labels: list[int] = []
    uint8 = contract["input_format"] == "uint8_nhwc"
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            x = torch.stack([t for t, _ in items])
            labels.extend(int(y) for _, y in items)
            ref.append(model(x).float().numpy())
            if uint8:
                images = [raw[i][0] for i in range(start, min(start + batch_size, n))]
                art.append(runner.run(preprocess_batch(images, contract)))
            else:
                art.append(runner.run(x.numpy()))
            if progress is not None:
                progress(min(start + batch_size, n), n)
    return np.concatenate(ref), np.concatenate(art), np.asarray(labels, dtype=np.int64)


def check_parity(run_dir: str | Path, artifact: str | Path | Runner, data_root: str | None = None,
                 thresholds: str | Mapping[str, Any] | None = None, limit: int | None = None,
                 precision: str | None = None, batch_size: int = 64, k: int = 10,
                 providers: list | None = None, write: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 flips_grid: str | Path | None = None) -> ParityReport:
    """Compare ``artifact`` (an .onnx/.engine path, or an open runner) with the run's PyTorch fp32 model.

    ``limit`` keeps a deterministic class-balanced subset of the evaluation split; ``precision`` picks the
    default thresholds (default: the artifact's own, from its contract); ``thresholds`` overrides them.
    With ``write`` (and a path artifact) the report is merged into ``parity.json`` next to the artifact,
    under the artifact's file name. ``flips_grid``: a PNG drawing the flipped queries (when there are any; see
    :func:`write_flips_grid`). Raises FingerprintMismatch if the artifact was exported from another model.
    """
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.export.runners import open_runner
    from ctxsim.nets import load_run
    from ctxsim.runs import run_config

    t0 = time.perf_counter()
    if batch_size < 1 or k < 1:
        raise ConfigError("batch_size and k must be >= 1")
    cfg = run_config(run_dir, data_root)
    model, card = load_run(run_dir)
    path: Path | None = None
    sha = ""
    if isinstance(artifact, (str, Path)):
        path = Path(artifact)
        # the bytes this verdict is about: hashed before they are opened, recorded with the verdict
        sha = sha256_file(path) if path.is_file() else ""
        runner = open_runner(path, providers)
    else:
        runner = artifact
    contract = runner.contract
    if contract.get("fingerprint") != card.fingerprint:
        raise FingerprintMismatch(
            f"{path or runner.name} was exported from model {contract.get('fingerprint')!r}, but {run_dir} holds "
            f"model {card.fingerprint!r}; compare an artifact with the run it was exported from")
    precision = precision or contract.get("precision", "fp32")
    limits = resolve_thresholds(precision, thresholds)
    if hasattr(runner, "max_batch"):  # a TensorRT engine's profile limit
        batch_size = min(batch_size, int(runner.max_batch))

    dataset = open_eval_dataset(cfg, card.preprocess, limit=limit)
    if len(dataset) < 2:
        raise ConfigError(f"the evaluation split has {len(dataset)} image(s); parity needs at least 2")
    raw = dataset.with_transform(None)
    ref, art, labels = _embed_both(model, runner, dataset, raw, contract, batch_size, progress)
    if art.shape != ref.shape:
        raise ArtifactError(f"{path or runner.name} returns embeddings of shape {list(art.shape[1:])}, "
                            f"the reference {list(ref.shape[1:])}; re-export it")

    failures: list[str] = []
    finite = np.isfinite(art).all(axis=1)
    if not finite.all():
        failures.append(f"{int((~finite).sum())} of {len(art)} artifact embeddings contain NaN or inf")
    embedding = embedding_agreement(ref, art)
    tie = limits.get("tie_margin", 0.0)
    retrieval, neighbours, cross = retrieval_agreement(ref, art, labels, tuple(sorted({1, *cfg.eval_ks})), k, tie)
    if "ties" in retrieval:
        share = retrieval["ties"]["near_tied"] / max(1, int((np.bincount(labels)[labels] > 1).sum()))
        if share > 0.1:  # e.g. an untrained model, whose embeddings all sit in a narrow cone
            log.warning("%.0f%% of the queries are near-ties (reference margin < tie_margin %g): ΔR@1 judges only "
                        "the rest; pass a smaller tie_margin to count them", 100 * share, tie)
        if flips_grid is not None and retrieval["ties"]["examples"]:
            write_flips_grid(retrieval["ties"]["examples"], raw, flips_grid)

    values = {
        "min_cosine": embedding["cosine_min"], "p1_cosine": embedding["cosine_p1"],
        "p50_cosine": embedding["cosine_p50"], "max_norm_error": embedding["norm_max_error"],
        "max_abs_delta_r1_points": abs(retrieval["ties"]["delta_R@1_points"]) if "ties" in retrieval else None,
        "max_abs_delta_map_r_points": (abs(retrieval["delta_points"]["MAP@R"])
                                       if retrieval["delta_points"] else None),
        "min_topk_jaccard": neighbours.get("jaccard_mean"),
        "max_abs_delta_cross_r1_points": abs(cross["delta_R@1_points"]) if cross else None,
    }
    checks = []
    for name, threshold in limits.items():
        if name in SETTINGS:
            continue
        row, msg = _check(name, values[name], threshold)
        checks.append(row)
        if msg:
            failures.append(msg)

    report = ParityReport(
        artifact=str(path) if path else getattr(runner, "name", "runner"), runner=getattr(runner, "name", "?"),
        precision=precision, fingerprint=card.fingerprint, images=len(labels), classes=len(np.unique(labels)),
        thresholds=limits, embedding=embedding, retrieval=retrieval, neighbours=neighbours, cross=cross,
        checks=checks, failures=failures, dataset=str(cfg.data.dataset),
        input_format=contract.get("input_format", "float_nchw"), seconds=time.perf_counter() - t0, sha256=sha)
    if write and path is not None:
        write_parity(path, report)
    return report


def write_parity(artifact: str | Path, report: ParityReport) -> Path:
    """Merge ``report`` into ``parity.json`` next to ``artifact`` (keyed by its file name), atomically. The record
    carries the sha256 of the bytes it was computed on (``report.sha256``; else the file's now), which
    :func:`recorded_verdict` requires to match before it trusts the verdict."""
    import json

    artifact = Path(artifact)
    if not report.sha256:
        report.sha256 = sha256_file(artifact)
    out = artifact.parent / PARITY_FILE
    existing: dict[str, Any] = {}
    if out.is_file():
        try:
            existing = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("replacing unreadable %s", out)
        if not isinstance(existing, dict):
            existing = {}
    existing[artifact.name] = report.to_dict()
    atomic_write_json(out, existing)
    return out


def parity_record(artifact: str | Path, sha256: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """The record ``parity.json`` next to ``artifact`` holds for exactly its bytes: (record, "") or (None, why there
    is no verdict). A record counts only when its ``sha256`` equals the file's (``sha256``: the file's, when the
    caller has it): a record of other bytes (an earlier export, a file replaced since, a record from before
    records carried a sha256) is no verdict, whatever it says."""
    import json

    path = Path(artifact)
    report = path.parent / PARITY_FILE
    if not path.is_file():
        return None, f"{path.name} is not an artifact file"
    if not report.is_file():
        return None, f"no {PARITY_FILE} beside {path.name}"
    try:
        entry = json.loads(report.read_text(encoding="utf-8")).get(path.name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None, f"{PARITY_FILE} is unreadable"
    if not isinstance(entry, dict) or not isinstance(entry.get("passed"), bool):
        return None, f"{PARITY_FILE} holds no verdict for {path.name}"
    if not entry.get("sha256"):
        return None, f"the {PARITY_FILE} record of {path.name} names no sha256 (not bound to any bytes)"
    if entry["sha256"] != (sha256 or sha256_file(path)):
        return None, f"the {PARITY_FILE} record of {path.name} is for other bytes (sha256 differs)"
    return entry, ""


def recorded_verdict(artifact: str | Path) -> tuple[bool | None, list[str]]:
    """The verdict ``parity.json`` next to ``artifact`` holds for its exact bytes: (passed, failures), or (None, [])
    when there is none (a run folder, a file never checked, an unreadable report, a record of other bytes: see
    :func:`parity_record`)."""
    entry, _ = parity_record(artifact)
    if entry is None:
        return None, []
    return entry["passed"], [str(f) for f in entry.get("failures", [])]


def raise_if_failed(reports: Mapping[str, ParityReport]) -> None:
    """ParityFailed, one line naming every failed check of ``reports`` (artifact name -> report), unless all
    passed."""
    failed = [f"{name} ({r.precision}): " + "; ".join(r.failures) for name, r in reports.items() if r.failures]
    if failed:
        raise ParityFailed("parity failed for " + "; and for ".join(failed))


def assert_parity(run_dir: str | Path, artifact: str | Path | Runner, **kwargs: Any) -> ParityReport:
    """:func:`check_parity` that raises ParityFailed (an AssertionError too, for pytest) listing the failures."""
    report = check_parity(run_dir, artifact, **kwargs)
    raise_if_failed({report.artifact: report})
    return report
