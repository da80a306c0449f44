"""Verification of an export folder (``ctxsim verify``): every hash manifest.json records, every artifact's model,
and that each parity verdict belongs to the bytes beside it. Rows are ``ctxsim.verify.Check``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctxsim.errors import CtxsimError
from ctxsim.export.manifest import MANIFEST, read_manifest
from ctxsim.export.parity import PARITY_FILE, parity_record
from ctxsim.export.runners import suffix_kind
from ctxsim.io import sha256_file
from ctxsim.verify import FAIL, NONE, OK, Check

__all__ = ["verify_artifact", "verify_export"]


def _contract_fingerprint(path: Path) -> tuple[str | None, str]:
    from ctxsim.export.runners import artifact_contract

    try:
        return artifact_contract(path).get("fingerprint"), ""
    except CtxsimError as e:
        return None, str(e)


def verify_export(folder: str | Path, label: str | None = None) -> list[Check]:
    """Check an export folder: manifest.json readable and self-consistent; each artifact it lists present, equal to
    its sha256 (engines: and their sidecars), of the manifest's model; no model file it does not list; each parity
    verdict (parity.json, and the manifest's summary of it) bound to the bytes of its artifact, and passed; the
    Triton repository's model files equal to the artifacts. ``label`` prefixes item names (default: the path)."""
    folder = Path(folder)
    at = (label if label is not None else str(folder)).rstrip("/")

    def name(rel: str) -> str:
        return f"{at}/{rel}" if at else rel

    if not (folder / MANIFEST).is_file():
        files = sorted(p.name for p in folder.iterdir() if suffix_kind(p) is not None) if folder.is_dir() else []
        return [Check(name(MANIFEST), "present", FAIL,
                      f"missing: {', '.join(files) or 'nothing'} bound to no model (an interrupted or partial export; "
                      "re-export with `ctxsim export`)")]
    try:
        manifest = read_manifest(folder)
        entries = manifest["artifacts"]
        if not isinstance(entries, dict):
            raise TypeError
    except CtxsimError as e:
        return [Check(name(MANIFEST), "readable", FAIL, str(e))]
    except (KeyError, TypeError):
        return [Check(name(MANIFEST), "readable", FAIL, "not an export manifest (no artifacts)")]
    fp = manifest.get("fingerprint")
    checks = [Check(name(MANIFEST), "readable", OK, f"model {fp}, {len(entries)} artifact(s)")]
    if not fp or (manifest.get("contract") or {}).get("fingerprint") != fp:
        checks.append(Check(name(MANIFEST), "fingerprint of its contract", FAIL,
                            f"manifest says {fp}, its contract {(manifest.get('contract') or {}).get('fingerprint')}"))

    hashes: dict[str, str] = {}  # artifact name -> its sha256 as on disk (only when it matches the manifest)
    for rel, entry in entries.items():
        path = Path(rel) if Path(rel).is_absolute() else folder / rel
        item = name(rel) if not Path(rel).is_absolute() else rel
        if not path.is_file():
            checks.append(Check(item, "present", FAIL, f"listed in {MANIFEST} but missing"))
            continue
        sha = sha256_file(path)
        if sha != entry.get("sha256"):
            checks.append(Check(item, f"sha256 in {MANIFEST}", FAIL,
                                "differs: changed since export, or an export was interrupted"))
        else:
            checks.append(Check(item, f"sha256 in {MANIFEST}", OK, sha[:16]))
            hashes[path.name] = sha
        art_fp, err = _contract_fingerprint(path)
        checks.append(Check(item, "model fingerprint", OK if art_fp == fp else FAIL,
                            f"{fp}" if art_fp == fp else (err or f"the file is model {art_fp}, {MANIFEST} says {fp}")))
        if entry.get("sidecar"):
            sp = path.with_name(entry["sidecar"])
            good = sp.is_file() and sha256_file(sp) == entry.get("sidecar_sha256")
            checks.append(Check(name(entry["sidecar"]), f"sha256 in {MANIFEST}", OK if good else FAIL,
                                "" if good else "missing or changed since export"))
            if good:
                checks.extend(_engine_source_check(folder, name, entry["sidecar"], sp, entries))

    listed = {Path(rel).name for rel in entries if not Path(rel).is_absolute()}
    for p in sorted(folder.iterdir()):
        if p.is_file() and suffix_kind(p) is not None and not p.name.startswith(".") and p.name not in listed:
            art_fp, _ = _contract_fingerprint(p)
            checks.append(Check(name(p.name), f"listed in {MANIFEST}", FAIL,
                                f"not bound by {MANIFEST} (model {art_fp}); remove it or re-export"))

    checks.extend(_parity_checks(folder, name, manifest, entries, hashes))
    checks.extend(_triton_checks(folder, name, manifest, entries))
    return checks


def _engine_source_check(folder: Path, name: Any, sidecar_name: str, sidecar_path: Path,
                         entries: dict[str, Any]) -> list[Check]:
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [Check(name(sidecar_name), "readable", FAIL, "not JSON")]
    src = sidecar.get("onnx_name")
    if not src or src not in entries:
        return []
    good = sidecar.get("onnx_sha256") == entries[src].get("sha256")
    return [Check(name(sidecar_name), f"built from {src} as exported", OK if good else FAIL,
                  "" if good else f"the engine was built from other {src} bytes")]


def _parity_checks(folder: Path, name: Any, manifest: dict[str, Any], entries: dict[str, Any],
                   hashes: dict[str, str]) -> list[Check]:
    checks: list[Check] = []
    summary = manifest.get("parity") or {}
    try:
        records = json.loads((folder / PARITY_FILE).read_text(encoding="utf-8")) \
            if (folder / PARITY_FILE).is_file() else {}
        if not isinstance(records, dict):
            raise ValueError
    except (OSError, ValueError):
        return [Check(name(PARITY_FILE), "readable", FAIL, "unreadable; re-export or re-run `ctxsim parity`")]
    fp = manifest.get("fingerprint")
    for rel in entries:
        path = folder / rel
        if Path(rel).is_absolute():
            continue
        item = name(rel)
        if path.name not in hashes:  # missing or changed (failed above): whatever is recorded is about other bytes
            if path.is_file() and (path.name in records or path.name in summary):
                checks.append(Check(item, "parity verdict bound to these bytes", NONE,
                                    "no verdict: the recorded one is for the exported bytes, not these"))
            continue
        record, why = parity_record(path, hashes[path.name])
        claimed = summary.get(path.name)
        if record is None:
            if path.name in records or claimed is not None:
                checks.append(Check(item, "parity verdict bound to these bytes", FAIL, f"no verdict: {why}"))
            else:
                checks.append(Check(item, "parity verdict", NONE, "none recorded (exported with --no-parity)"))
            continue
        if record.get("fingerprint") != fp:
            checks.append(Check(item, "parity verdict of this model", FAIL,
                                f"computed against model {record.get('fingerprint')}, the folder is {fp}"))
            continue
        if claimed is not None and (claimed.get("passed") != record["passed"]
                                    or (claimed.get("sha256") and claimed["sha256"] != hashes[path.name])):
            checks.append(Check(item, f"{MANIFEST} parity summary", FAIL,
                                f"says passed={claimed.get('passed')} for other bytes or another verdict than "
                                f"{PARITY_FILE}"))
        if record["passed"]:
            checks.append(Check(item, "parity verdict bound to these bytes", OK,
                                f"passed ({record.get('precision')}, {record.get('images')} images)"))
        else:
            first = "; ".join(str(f) for f in (record.get("failures") or [])[:1])
            checks.append(Check(item, "parity verdict bound to these bytes", FAIL, f"parity FAILED: {first}"))
    names = {Path(rel).name for rel in entries}
    for key in sorted(set(records) | set(summary)):
        if key not in names and not (folder / key).is_file():
            where = PARITY_FILE if key in records else MANIFEST
            checks.append(Check(name(where), f"verdict for {key}", FAIL, f"{key} is not here: a stale verdict"))
    return checks


def _triton_checks(folder: Path, name: Any, manifest: dict[str, Any], entries: dict[str, Any]) -> list[Check]:
    rel = manifest.get("triton")
    if not rel:
        return []
    repo = Path(rel) if Path(rel).is_absolute() else folder / rel
    if not repo.is_dir():
        return [Check(name(str(rel)), "present", FAIL, f"named by {MANIFEST} but missing")]
    want = {"model.onnx": (entries.get("model.onnx") or {}).get("sha256")}
    engines = [e for e in entries.values() if e.get("kind") == "tensorrt_engine"]
    checks = []
    for copy in sorted(repo.glob("*/1/model.onnx")) + sorted(repo.glob("*/1/model.plan")):
        wanted = want["model.onnx"] if copy.suffix == ".onnx" else (engines[0]["sha256"] if len(engines) == 1 else None)
        if wanted is None:
            continue
        good = sha256_file(copy) == wanted
        label = f"{rel}/{copy.relative_to(repo)}" if not Path(rel).is_absolute() else str(copy)
        checks.append(Check(name(label) if not Path(rel).is_absolute() else label, "equal to the exported artifact",
                            OK if good else FAIL, "" if good else "differs from the artifact in the manifest"))
    return checks


def verify_artifact(path: str | Path, label: str | None = None) -> list[Check]:
    """Check one export artifact (an index's model): bound by the manifest beside it (when there is one), and its
    parity verdict bound to its bytes."""
    from ctxsim.export.manifest import check_artifact

    path = Path(path)
    item = label if label is not None else str(path)
    checks = []
    try:
        entry = check_artifact(path)
    except CtxsimError as e:
        return [Check(item, f"bound by {MANIFEST}", FAIL, str(e))]
    checks.append(Check(item, f"bound by {MANIFEST}", OK if entry is not None else NONE,
                        "sha256 as exported" if entry is not None else f"no {MANIFEST} lists it (unbound)"))
    record, why = parity_record(path)
    if record is None:
        checks.append(Check(item, "parity verdict bound to these bytes", NONE, f"no verdict: {why}"))
    elif record["passed"]:
        checks.append(Check(item, "parity verdict bound to these bytes", OK, "passed"))
    else:
        first = "; ".join(str(f) for f in (record.get("failures") or [])[:1])
        checks.append(Check(item, "parity verdict bound to these bytes", FAIL, f"parity FAILED: {first}"))
    return checks
