"""``verify(path)``: the checks every reader runs, on a run folder, an export folder or an index folder, as one
report (``ctxsim verify``, for a CI/CD pipeline before artifacts are shipped to a fleet).

The folder kind is found from what it holds: ``index.json`` (index), ``model.json`` (run), ``manifest.json`` or
model files (export). Run folders are checked by ``ctxsim.verify.verify_run``, export folders by
``ctxsim.export.verify.verify_export``; an index folder here: each file against the sha256 in index.json, the
item table, embeddings and FAISS index against its count and dimension, and the model it names: present, its own
bytes bound (a run folder's weights, an export artifact's manifest and parity verdict), and of the fingerprint the
index was built with. Unusable input (no such path, a folder of none of these kinds) raises ArtifactError.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctxsim.errors import ArtifactError, CtxsimError
from ctxsim.io import sha256_file
from ctxsim.verify import FAIL, NONE, OK, Check, VerifyReport, verify_run

__all__ = ["folder_kind", "verify", "verify_index"]


def folder_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """("run" | "export" | "index", the folder) for ``path`` (a folder, or a file in one: model.json,
    manifest.json, index.json, a .onnx/.engine); ArtifactError when it is none of these."""
    from ctxsim.export.runners import suffix_kind

    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"{p} not found; pass a run folder, an export folder or an index folder")
    if p.is_file():
        by_name = {"index.json": "index", "model.json": "run", "manifest.json": "export", "parity.json": "export"}
        if p.name in by_name:
            return by_name[p.name], p.parent
        if suffix_kind(p):
            return "export", p.parent
        raise ArtifactError(f"{p} is a file of no ctxsim folder; pass a run folder, an export folder or an index "
                            "folder")
    if (p / "index.json").is_file():
        return "index", p
    if (p / "model.json").is_file():
        return "run", p
    if (p / "manifest.json").is_file() or any(suffix_kind(c) for c in p.iterdir() if c.is_file()):
        return "export", p
    raise ArtifactError(f"{p} is not a run, export or index folder (no model.json, manifest.json, model.onnx or "
                        "index.json)")


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check every recorded hash, fingerprint and verdict of the folder at ``path`` (see the module docstring)."""
    kind, folder = folder_kind(path)
    if kind == "run":
        checks = verify_run(folder, label="")
    elif kind == "export":
        from ctxsim.export.verify import verify_export

        checks = verify_export(folder, label="")
    else:
        checks = verify_index(folder, label="")
    return VerifyReport(str(folder), kind, checks)


def verify_index(index_dir: str | os.PathLike, label: str | None = None) -> list[Check]:
    """Check an index folder (see the module docstring)."""
    from ctxsim.deploy.index import META, load_index, read_index_info

    folder = Path(index_dir)
    at = (label if label is not None else str(folder)).rstrip("/")

    def name(rel: str) -> str:
        return f"{at}/{rel}" if at else rel

    try:
        info = read_index_info(folder)
    except CtxsimError as e:
        return [Check(name(META), "readable", FAIL, str(e))]
    checks = [Check(name(META), "readable", OK, f"{info.index_type}, {info.count} items, model {info.fingerprint}, "
                                                 f"generation {info.generation}")]
    intact = True
    for role, fname in sorted(info.files.items()):
        p = folder / fname
        want = info.sha256.get(role)
        if not p.is_file():
            checks.append(Check(name(fname), f"present ({role})", FAIL, f"named by {META} but missing"))
            intact = False
        elif not want:
            checks.append(Check(name(fname), f"sha256 in {META}", NONE, "no hash recorded"))
        elif sha256_file(p) != want:
            checks.append(Check(name(fname), f"sha256 in {META}", FAIL, "differs: damaged or replaced"))
            intact = False
        else:
            checks.append(Check(name(fname), f"sha256 in {META}", OK, want[:16]))
    if intact:
        checks.extend(_contents(folder, info, name, load_index))
    checks.extend(_model_checks(info))
    return checks


def _contents(folder: Path, info, name, load_index) -> list[Check]:
    from ctxsim.errors import MissingDependency

    try:
        idx = load_index(folder, verify=False, device="cpu")
    except MissingDependency as e:
        return [Check(name(info.files.get("index", "index")), "readable", NONE, f"not checked here: {e}")]
    except CtxsimError as e:
        return [Check(name("index"), "consistent with its count", FAIL, str(e))]
    idx.close()  # a Milvus client: the Lite file released (what is checked below is in the folder)
    checks = [Check(name(info.files.get("items", "items")), f"{info.count} items", OK, "")]
    if info.engine == "milvus" and info.milvus:  # opening it checked the collection's fingerprint, dim and count
        checks.append(Check(f"milvus:{info.milvus.get('collection')}", f"{info.count} vectors, this model", OK,
                            f"{info.milvus.get('index_type')} at {info.milvus.get('uri')}"))
    if "index" in info.files:
        checks.append(Check(name(info.files["index"]), f"{info.count} vectors", OK, info.index_type))
    if "embeddings" in info.files:
        emb = np.asarray(idx.embeddings)
        if emb.shape != (info.count, info.dim):
            checks.append(Check(name(info.files["embeddings"]), f"shape [{info.count}, {info.dim}]", FAIL,
                                f"holds {list(emb.shape)}"))
        elif not np.isfinite(emb).all():
            checks.append(Check(name(info.files["embeddings"]), "finite", FAIL, "holds NaN or inf embeddings"))
        else:
            checks.append(Check(name(info.files["embeddings"]), f"[{info.count}, {info.dim}] finite", OK, ""))
    return checks


def _model_checks(info) -> list[Check]:
    """The model index.json names: present, its own bytes bound, and the model the index was built with."""
    from ctxsim.export.runners import resolve_artifact

    ref = info.model
    item = f"model {ref}"
    if not ref:
        return [Check("model", "named by index.json", FAIL, "index.json names no model")]
    if not Path(ref).exists():
        return [Check(item, "present", FAIL, "the model the index names is not here")]
    try:
        kind, p = resolve_artifact(ref)
    except CtxsimError as e:
        return [Check(item, "a model artifact", FAIL, str(e))]
    item = str(p)
    if kind == "torch":
        checks = verify_run(p, label=str(p))
        from ctxsim.nets.card import read_card

        fp: str | None
        try:
            fp = read_card(p).fingerprint
        except CtxsimError:
            return checks  # failed above
    else:
        from ctxsim.export.runners import artifact_contract
        from ctxsim.export.verify import verify_artifact

        checks = verify_artifact(p, label=str(p))
        try:
            fp = artifact_contract(p).get("fingerprint")
        except CtxsimError as e:
            return checks + [Check(str(p), "readable contract", FAIL, str(e))]
    same = fp == info.fingerprint
    checks.append(Check(item, "is the model the index was built with", OK if same else FAIL,
                        info.fingerprint if same else f"it is model {fp}, the index was built with {info.fingerprint}"))
    return checks
