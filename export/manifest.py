"""manifest.json of an export folder: binds every artifact (sha256), engine sidecars, parity results and the
preprocessing contract to the model fingerprint, so that deploy can check what it is about to load.

``check_artifact(path)`` is that check, run by every reader that opens an export artifact (the deploy Embedder,
hence search, index and serve): an artifact whose bytes differ from the manifest beside it, or an unlisted one
exported from another model, is refused with one line. A folder without a manifest is unbound (no verdict).
``export_run`` writes the manifest last, when the folder is published (``ctxsim.export.publish``)."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from ctxsim.errors import ArtifactError
from ctxsim.io import atomic_write_json, read_json, sha256_file
from ctxsim.schema import check

__all__ = ["MANIFEST", "MANIFEST_VERSION", "ArtifactEntry", "Manifest", "check_artifact", "read_manifest",
           "verify_manifest", "write_manifest"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class _EntryKeys(TypedDict):
    sha256: str


class ArtifactEntry(_EntryKeys, total=False):
    """One artifact of ``manifest.json``'s ``artifacts`` (what readers check; other keys are kept as they are)."""

    bytes: int
    kind: str
    precision: str | None
    fingerprint: str | None
    input_format: str | None
    sidecar: str
    sidecar_sha256: str
    onnx_sha256: str | None


class _ManifestKeys(TypedDict):
    fingerprint: str
    artifacts: dict[str, ArtifactEntry]


class Manifest(_ManifestKeys, total=False):
    """``manifest.json`` as readers check it (types of the keys they use; other keys are kept as they are)."""

    manifest_version: int
    ctxsim_version: str
    embedding_dim: int | None
    contract: dict[str, Any]
    parity: dict[str, dict[str, Any]]
    triton: str | None


def _artifact_entry(path: Path) -> dict[str, Any]:
    from ctxsim.export.runners import artifact_contract, suffix_kind

    entry: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if suffix_kind(path) == "tensorrt":
        from ctxsim.export.tensorrt import read_sidecar, sidecar_path

        sidecar = read_sidecar(path)
        entry.update(kind="tensorrt_engine", precision=sidecar["precision"],
                     sidecar=sidecar_path(path).name, sidecar_sha256=sha256_file(sidecar_path(path)),
                     tensorrt_version=sidecar["tensorrt_version"], gpu_name=sidecar["gpu_name"],
                     compute_capability=sidecar["compute_capability"], profile=sidecar["profile"],
                     onnx_sha256=sidecar.get("onnx_sha256"))
        contract = sidecar["contract"]
    else:
        contract = artifact_contract(path)
        entry.update(kind="onnx", precision=contract.get("precision"), opset=contract.get("opset"))
    entry["input_format"] = contract.get("input_format")
    entry["fingerprint"] = contract.get("fingerprint")
    return entry


def write_manifest(out_dir: str | Path, contract: Mapping[str, Any], artifacts: Iterable[str | Path],
                   parity: Mapping[str, Any] | None = None, run_dir: str | Path | None = None,
                   triton_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/manifest.json`` atomically. Every artifact must carry ``contract['fingerprint']``.

    ``parity`` maps an artifact file name to its ParityReport (or its dict); only the verdict, thresholds and
    headline numbers go in the manifest (the full reports are in parity.json).
    """
    from ctxsim import __version__

    out_dir = Path(out_dir)
    fp = contract.get("fingerprint")
    entries: dict[str, Any] = {}
    for a in artifacts:
        a = Path(a)
        entry = _artifact_entry(a)
        if entry["fingerprint"] != fp:
            raise ArtifactError(f"{a.name} was exported from model {entry['fingerprint']!r}, not {fp!r}; "
                                "export all artifacts of a folder from one run")
        entries[a.name if a.parent == out_dir else str(a)] = entry
    summary: dict[str, Any] = {}
    for name, report in (parity or {}).items():
        d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        summary[name] = {
            "passed": d.get("passed"), "failures": d.get("failures", []), "precision": d.get("precision"),
            "images": d.get("images"), "dataset": d.get("dataset"), "thresholds": d.get("thresholds", {}),
            "cosine_min": d.get("embedding", {}).get("cosine_min"),
            "delta_points": d.get("retrieval", {}).get("delta_points", {}),
            "r1_flips": {k: v for k, v in (d.get("retrieval", {}).get("ties") or {}).items() if k != "examples"},
            "cross_R@1": d.get("cross", {}).get("R@1"), "sha256": d.get("sha256"),
        }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ctxsim_version": __version__,
        "fingerprint": fp,
        "embedding_dim": contract.get("embedding_dim"),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "contract": dict(contract),
        "artifacts": entries,
        "parity": summary,
        "triton": _relative(triton_dir, out_dir),
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def _relative(path: str | Path | None, base: Path) -> str | None:
    if path is None:
        return None
    path = Path(path)
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """``out_dir/manifest.json``, its types checked: ArtifactError (one line) naming the first problem."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{out_dir} has no {MANIFEST}; export a run there with `ctxsim export`")
    manifest = check(read_json(path), Manifest, "manifest", error=ArtifactError, where=str(path),
                     hint="re-export the folder with `ctxsim export`")
    if manifest.get("manifest_version", 1) > MANIFEST_VERSION:
        raise ArtifactError(f"{path} was written by a newer ctxsim (manifest version "
                            f"{manifest['manifest_version']}); upgrade ctxsim")
    return manifest


def verify_manifest(out_dir: str | Path) -> list[str]:
    """Problems found (missing files, sha256 mismatches); an empty list means every artifact is as exported."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    problems = []
    for name, entry in manifest.get("artifacts", {}).items():
        p = out_dir / name if not Path(name).is_absolute() else Path(name)
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{name} changed since export (sha256 differs)")
        if entry.get("sidecar"):
            sp = p.with_name(entry["sidecar"])
            if not sp.is_file() or sha256_file(sp) != entry.get("sidecar_sha256"):
                problems.append(f"{entry['sidecar']} is missing or changed")
    return problems


def check_artifact(path: str | Path) -> dict[str, Any] | None:
    """Refuse (ArtifactError, one line) an export artifact that contradicts the ``manifest.json`` beside it: a
    listed file whose sha256 (or engine sidecar's) differs from the manifest's, or an unlisted one exported from
    another model than the folder's. Returns the artifact's manifest entry, or None when it is unbound (no manifest
    beside it, or listed nowhere but of the folder's model)."""
    path = Path(path)
    folder = path.parent
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    entries = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        raise ArtifactError(f"{folder / MANIFEST} lists no artifacts; re-export the folder with `ctxsim export`")
    entry = entries.get(path.name)
    if entry is None:
        from ctxsim.export.runners import artifact_contract

        fp = artifact_contract(path).get("fingerprint")
        if fp != manifest.get("fingerprint"):
            raise ArtifactError(f"{path} is model {fp}, but {MANIFEST} beside it binds the folder to model "
                                f"{manifest.get('fingerprint')} (left from another export?); re-export with "
                                "`ctxsim export`")
        return None
    if sha256_file(path) != entry.get("sha256"):
        raise ArtifactError(f"{path} does not match the sha256 in {MANIFEST} (changed since export, or an export "
                            "was interrupted); re-export with `ctxsim export`")
    if entry.get("sidecar"):
        sp = path.with_name(entry["sidecar"])
        if not sp.is_file() or sha256_file(sp) != entry.get("sidecar_sha256"):
            raise ArtifactError(f"{sp} is missing or does not match the sha256 in {MANIFEST}; re-export with "
                                "`ctxsim export --trt`")
    return entry
