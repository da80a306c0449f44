"""A Triton Inference Server model repository for an export: ONNX Runtime model, and TensorRT plan where built.

Layout::

    <out_dir>/<name>_onnx/config.pbtxt      platform "onnxruntime_onnx"
    <out_dir>/<name>_onnx/1/model.onnx
    <out_dir>/<name>_trt/config.pbtxt       platform "tensorrt_plan"   (only with an engine)
    <out_dir>/<name>_trt/1/model.plan

Both take input "images" (dims without the batch axis, from the contract) and return "embeddings" [D] float32,
with dynamic batching. ``parse_pbtxt`` reads the subset of protobuf text format these files use.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ctxsim.errors import ArtifactError, ConfigError
from ctxsim.io import atomic_write_bytes, atomic_write_text

__all__ = ["INSTANCE_KINDS", "TRITON_DTYPES", "model_config", "parse_pbtxt", "preferred_batch_sizes",
           "write_triton_repository"]

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
CONTRACT_PARAMETER = "ctxsim_contract"  # config.pbtxt parameter: the export contract as JSON


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch_size`` (and ``max_batch_size`` itself)."""
    sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b <= max_batch_size]
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sizes


def model_config(name: str, platform: str, contract: dict[str, Any], max_batch_size: int, instances: int,
                 instance_kind: str = "KIND_GPU", queue_delay_us: int = 100) -> str:
    """The config.pbtxt text of one model."""
    in_dims = ", ".join(str(d) for d in contract["input_shape"][1:])
    sizes = ", ".join(str(b) for b in preferred_batch_sizes(max_batch_size))
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n  {\n"
        f'    name: "{contract["input_name"]}"\n'
        f"    data_type: {TRITON_DTYPES[contract['input_dtype']]}\n"
        f"    dims: [ {in_dims} ]\n"
        "  }\n]\n"
        "output [\n  {\n"
        f'    name: "{contract["output_name"]}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {int(contract['embedding_dim'])} ]\n"
        "  }\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {sizes} ]\n"
        f"  max_queue_delay_microseconds: {int(queue_delay_us)}\n"
        "}\n"
        "instance_group [\n  {\n"
        f"    count: {int(instances)}\n"
        f"    kind: {instance_kind}\n"
        "  }\n]\n"
        # the export contract (preprocessing, fingerprint) for ctxsim's triton:// embedder, as one JSON string
        "parameters {\n"
        f'  key: "{CONTRACT_PARAMETER}"\n'
        f"  value {{ string_value: \"{_pbtxt_escape(json.dumps(contract, sort_keys=True))}\" }}\n"
        "}\n"
    )


def _pbtxt_escape(text: str) -> str:
    """``text`` (ASCII: json.dumps escapes the rest) as the inside of a protobuf text-format string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_triton_repository(out_dir: str | Path, onnx_path: str | Path, engine_path: str | Path | None = None,
                            max_batch_size: int = 64, instances: int = 1, name: str = "ctxsim",
                            instance_kind: str = "KIND_GPU") -> Path:
    """Write the model repository under ``out_dir``; returns ``out_dir``. The contract comes from the ONNX
    metadata (and the engine sidecar); a TensorRT model's max_batch_size may not exceed its profile's max."""
    from ctxsim.export.onnx_export import read_onnx_contract

    if max_batch_size < 1 or instances < 1:
        raise ConfigError("max_batch_size and instances must be >= 1")
    if instance_kind not in INSTANCE_KINDS:
        raise ConfigError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"Triton model name {name!r} may only hold letters, digits, '_', '.', '-'")
    out_dir, onnx_path = Path(out_dir), Path(onnx_path)
    contract = read_onnx_contract(onnx_path)
    onnx_model = out_dir / f"{name}_onnx"
    atomic_write_bytes(onnx_model / "1" / "model.onnx", onnx_path.read_bytes())
    atomic_write_text(onnx_model / "config.pbtxt",
                      model_config(onnx_model.name, "onnxruntime_onnx", contract, max_batch_size, instances,
                                   instance_kind))
    if engine_path is not None:
        from ctxsim.export.tensorrt import read_sidecar

        engine_path = Path(engine_path)
        sidecar = read_sidecar(engine_path)
        profile_max = int(sidecar["profile"]["max"][0])
        if max_batch_size > profile_max:
            raise ConfigError(f"max_batch_size {max_batch_size} exceeds the engine's profile maximum {profile_max}; "
                              "lower it or rebuild the engine with a larger max batch")
        if sidecar["contract"].get("fingerprint") != contract.get("fingerprint"):
            raise ArtifactError(f"{engine_path.name} and {onnx_path.name} come from different models")
        trt_model = out_dir / f"{name}_trt"
        atomic_write_bytes(trt_model / "1" / "model.plan", engine_path.read_bytes())
        atomic_write_text(trt_model / "config.pbtxt",
                          model_config(trt_model.name, "tensorrt_plan", sidecar["contract"], max_batch_size,
                                       instances, "KIND_GPU"))
    return out_dir


# ---------------------------------------------------------------------------------------------- reading
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([^\s\[\]{}:,"#]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"cannot read config.pbtxt near {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    for cast in (int, float):
        try:
            return cast(tok)
        except ValueError:
            pass
    return tok  # an enum such as TYPE_FP32 or KIND_GPU, or true/false


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Parse protobuf text format (the subset config.pbtxt uses) into a dict; a repeated field is a list."""
    toks = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = toks[pos]
        if tok == "{":
            pos += 1
            return message("}")
        if tok == "[":
            pos += 1
            items = []
            while toks[pos] != "]":
                items.append(value())
                if toks[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        return _scalar(tok)

    def message(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(toks) and toks[pos] != end:
            key = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            v = value()
            if key in out:  # a repeated field written as several entries
                old = out[key] if isinstance(out[key], list) else [out[key]]
                out[key] = old + (v if isinstance(v, list) else [v])
            else:
                out[key] = v
            if pos < len(toks) and toks[pos] == ",":
                pos += 1
        if end is not None:
            pos += 1
        return out

    try:
        return message(None)
    except IndexError:
        raise ConfigError("config.pbtxt ends in the middle of a field") from None
