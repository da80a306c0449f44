"""Accuracy parity of an exported artifact against the PyTorch fp32 reference, on real evaluation images.

Both models embed the same images of the run's evaluation split (``ctxsim.data.pipeline.open_eval_dataset``):
the reference gets the eval transform's float tensors, the artifact gets ``preprocess_batch`` of the same images
under its own contract (identical tensors for ``float_nchw``; raw uint8 pixels for ``uint8_nhwc``). Compared:

- embedding level: per-image cosine between reference and artifact embedding (min, p1, p50, mean) and the
  largest deviation of an artifact embedding's norm from 1;
- retrieval level (leave-one-out, ``ctxsim.evaluate.retrieval_metrics``): Recall@K, MAP@R, R-precision of
  each model and their differences (in percentage points);
- R@1 flips: queries whose top-1 verdict (right class or not) differs between the two models. A query whose
  reference *decision margin* (best same-class similarity minus best other-class similarity) is below
  ``tie_margin`` is a near-tie: a rounding error smaller than the precision's own decides it, so its flip is
  reported but left out of the ΔR@1 that ``max_abs_delta_r1_points`` checks (the raw ΔR@1 stays in
  ``retrieval["delta_points"]``);
- neighbourhoods: mean Jaccard overlap of the k-NN index sets (``ctxsim.knn.knn``) of the two models;
- cross-model retrieval: artifact-embedded queries against the reference-embedded gallery (leave-one-out),
  its Recall@1, i.e. whether an artifact query still finds the right items in a gallery indexed with PyTorch.

Thresholds depend on the precision (:data:`DEFAULT_THRESHOLDS`); any can be overridden with a dict or a
``"key=value,key=value"`` string (``value`` may be ``none`` to switch a check off).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, FingerprintMismatch, ParityFailed
from ctxsim.io import atomic_write_json, sha256_file

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
    retrieval: dict[str, dict[str, float]]
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


# ---------------------------------------------------------------------------------------------- measures
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [N, D] arrays (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-30)


def topk_jaccard(a_idx: np.ndarray, b_idx: np.ndarray) -> np.ndarray:
    """Per-row Jaccard overlap of two [N, k] neighbour index sets."""
    k = a_idx.shape[1]
    inter = (a_idx[:, :, None] == b_idx[:, None, :]).any(axis=2).sum(axis=1)
    return inter / (2 * k - inter)


def cross_recall_at_1(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    """R@1 of ``queries[i]`` against ``gallery`` without item i (leave-one-out across two embeddings of the
    same items); queries whose class has no other item are skipped, as in ``retrieval_metrics``."""
    from ctxsim.knn import knn

    _, idx = knn(queries, gallery, 1, exclude_self=True)
    counts = np.bincount(labels)
    valid = counts[labels] > 1
    if not valid.any():
        return float("nan")
    return float((labels[idx[:, 0]] == labels)[valid].mean())


def r1_margins(embeddings: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Leave-one-out R@1 decision margin of every item: its best same-class similarity minus its best
    other-class similarity (> 0: the top-1 neighbour is of its class). +inf where no other class exists,
    NaN where its class has no other item (such queries do not count in R@1)."""
    import torch

    labels = np.asarray(labels, dtype=np.int64)
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    lab = torch.from_numpy(labels)
    out = np.empty(len(lab), dtype=np.float64)
    for start in range(0, len(lab), chunk):
        stop = min(start + chunk, len(lab))
        sims = (emb[start:stop] @ emb.T).double()
        same = lab[start:stop, None] == lab[None, :]
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = float("-inf")  # the query itself (same class, so out of best_other too)
        best_same = sims.masked_fill(~same, float("-inf")).amax(1)
        best_other = sims.masked_fill(same, float("-inf")).amax(1)
        out[start:stop] = (best_same - best_other).numpy()
    out[np.bincount(labels)[labels] < 2] = np.nan
    return out


def r1_flips(margins_ref: np.ndarray, margins_art: np.ndarray, tie_margin: float) -> dict[str, float]:
    """Queries whose top-1 verdict differs between two embeddings of the same items, and ΔR@1 (points, over all
    valid queries) counting only the queries the reference decides by at least ``tie_margin``."""
    valid = ~np.isnan(margins_ref)
    hit_ref, hit_art = margins_ref > 0, margins_art > 0
    flipped = valid & (hit_ref != hit_art)
    near = valid & (np.abs(margins_ref) < tie_margin)
    gain = hit_art.astype(np.int64) - hit_ref.astype(np.int64)
    n = max(int(valid.sum()), 1)
    return {"tie_margin": float(tie_margin), "near_tied": int(near.sum()), "flips": int(flipped.sum()),
            "flips_near_tied": int((flipped & near).sum()),
            "delta_R@1_points": 100.0 * float(gain[valid & ~near].sum()) / n}


def flip_examples(ref: np.ndarray, art: np.ndarray, labels: np.ndarray, margins_ref: np.ndarray,
                  margins_art: np.ndarray, tie_margin: float, most: int = 32) -> list[dict[str, Any]]:
    """The flipped queries (at most ``most``, decisive ones first, then by falling reference margin), each with
    its top-1 neighbour under both models: ``{"query", "label", "reference_top1", "reference_score",
    "reference_hit", "artifact_top1", "artifact_score", "artifact_hit", "margin", "near_tie"}`` (indices into the
    evaluation split; a hit: the top-1 is of the query's class)."""
    valid = ~np.isnan(margins_ref)
    flipped = np.flatnonzero(valid & ((margins_ref > 0) != (margins_art > 0)))
    rows = flipped[np.argsort(-np.abs(margins_ref[flipped]), kind="stable")][:most]
    if not len(rows):
        return []
    tops = []
    for emb in (ref, art):
        sims = emb[rows].astype(np.float64) @ emb.T.astype(np.float64)
        sims[np.arange(len(rows)), rows] = -np.inf
        j = sims.argmax(1)
        tops.append((j, sims[np.arange(len(rows)), j]))
    (j_ref, s_ref), (j_art, s_art) = tops
    out = []
    for n, q in enumerate(rows):
        out.append({"query": int(q), "label": int(labels[q]),
                    "reference_top1": int(j_ref[n]), "reference_score": float(s_ref[n]),
                    "reference_hit": bool(labels[j_ref[n]] == labels[q]),
                    "artifact_top1": int(j_art[n]), "artifact_score": float(s_art[n]),
                    "artifact_hit": bool(labels[j_art[n]] == labels[q]),
                    "margin": float(margins_ref[q]), "near_tie": bool(abs(margins_ref[q]) < tie_margin)})
    return out


def write_flips_grid(examples: list[dict[str, Any]], dataset: Any, out_png: str | Path, thumb: int = 96) -> Path:
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
def _embed_both(model, runner, dataset, raw, contract, batch_size, progress):
    import torch

    from ctxsim.export.contract import preprocess_batch

    n = len(dataset)
    ref, art, labels = [], [], []
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


def check_parity(run_dir: str | Path, artifact: str | Path | Any, data_root: str | None = None,
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
    from ctxsim.evaluate import retrieval_metrics
    from ctxsim.export.runners import open_runner
    from ctxsim.knn import knn
    from ctxsim.nets import load_run
    from ctxsim.runs import run_config

    t0 = time.perf_counter()
    if batch_size < 1 or k < 1:
        raise ConfigError("batch_size and k must be >= 1")
    cfg = run_config(run_dir, data_root)
    model, card = load_run(run_dir)
    path = Path(artifact) if isinstance(artifact, (str, Path)) else None
    # the bytes this verdict is about: hashed before they are opened, recorded with the verdict
    sha = sha256_file(path) if path is not None and path.is_file() else ""
    runner = open_runner(path, providers) if path is not None else artifact
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
    cos = cosine_rows(ref, art)
    cos = np.where(finite, cos, -1.0)
    norms_art = np.linalg.norm(art.astype(np.float64), axis=1)
    norms_ref = np.linalg.norm(ref.astype(np.float64), axis=1)
    embedding = {
        "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1)),
        "cosine_p50": float(np.percentile(cos, 50)), "cosine_mean": float(cos.mean()),
        "norm_max_error": float(np.nanmax(np.abs(norms_art - 1.0))) if finite.any() else float("nan"),
        "norm_max_error_reference": float(np.abs(norms_ref - 1.0).max()),
    }

    ks = tuple(sorted({1, *cfg.eval_ks}))
    m_ref = retrieval_metrics(ref, labels, ks=ks)
    retrieval: dict[str, dict[str, float]] = {"reference": m_ref, "artifact": {}, "delta_points": {}}
    neighbours: dict[str, float] = {}
    cross: dict[str, float] = {}
    if finite.all():
        m_art = retrieval_metrics(art, labels, ks=ks)
        retrieval["artifact"] = m_art
        retrieval["delta_points"] = {key: 100.0 * (m_art[key] - m_ref[key]) for key in m_ref}
        k_eff = min(int(k), len(labels) - 1)
        _, i_ref = knn(ref, ref, k_eff, exclude_self=True)
        _, i_art = knn(art, art, k_eff, exclude_self=True)
        neighbours = {"k": k_eff, "jaccard_mean": float(topk_jaccard(i_ref, i_art).mean())}
        margins_ref, margins_art = r1_margins(ref, labels), r1_margins(art, labels)
        tie = limits.get("tie_margin", 0.0)
        retrieval["ties"] = r1_flips(margins_ref, margins_art, tie)
        retrieval["ties"]["examples"] = flip_examples(ref, art, labels, margins_ref, margins_art, tie)
        share = retrieval["ties"]["near_tied"] / max(1, int((~np.isnan(margins_ref)).sum()))
        if share > 0.1:  # e.g. an untrained model, whose embeddings all sit in a narrow cone
            log.warning("%.0f%% of the queries are near-ties (reference margin < tie_margin %g): ΔR@1 judges only "
                        "the rest; pass a smaller tie_margin to count them", 100 * share, tie)
        if flips_grid is not None and retrieval["ties"]["examples"]:
            write_flips_grid(retrieval["ties"]["examples"], raw, flips_grid)
        cross_r1 = cross_recall_at_1(art, ref, labels)
        cross = {"R@1": cross_r1, "delta_R@1_points": 100.0 * (cross_r1 - m_ref["R@1"])}

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
        precision=precision, fingerprint=card.fingerprint, images=len(labels), classes=int(len(np.unique(labels))),
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


def assert_parity(run_dir: str | Path, artifact: str | Path | Any, **kwargs: Any) -> ParityReport:
    """:func:`check_parity` that raises ParityFailed (an AssertionError too, for pytest) listing the failures."""
    report = check_parity(run_dir, artifact, **kwargs)
    raise_if_failed({report.artifact: report})
    return report
