"""Export a run's embedding network to ONNX (fp32 and an fp16 variant), with the preprocessing contract inside.

Exporter choice: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter). On this project's graphs
(ConvNet, ResNet, MobileNetV3, EfficientNet + pooling + LayerNorm + L2 normalisation) it honours the requested
opset (17 by default; the dynamo exporter in torch 2.14 only emits opset >= 18 and fails to down-convert these
graphs), is 2-5x faster, and gives the same numbers. Where a future torch removes it, the dynamo exporter
(``dynamo=True``, needs onnxscript) is used instead, at opset >= 18; ``ExportResult.exporter`` says which ran.

Every file is built and checked in memory first, then all are written through ``ctxsim.io.atomic_path``: a
failure anywhere leaves earlier artifacts untouched and no temporary files behind.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export.contract import INPUT_NAME, OUTPUT_NAME, build_contract, check_input_format, contract_to_metadata
from ctxsim.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from ctxsim.nets import EmbeddingNet

__all__ = ["DEFAULT_OPSET", "FP32_KEEP", "ONNX_FP16_NAME", "ONNX_NAME", "ExportResult", "export_onnx", "keep_fp32",
           "read_onnx_contract"]

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_FP16_NAME = "model.fp16.onnx"
DEFAULT_OPSET = 17
_MAX_PROTO_BYTES = 2 * 1024 ** 3 - 1  # protobuf's single-message limit; bigger models would need external data


@dataclass
class ExportResult:
    """What an export wrote. ``export_onnx`` fills the ONNX fields; ``export_run`` fills the rest."""

    out_dir: Path
    onnx_path: Path
    contract: dict[str, Any]
    fingerprint: str
    fp16_path: Path | None = None
    int8_path: Path | None = None                                # model.int8.onnx (export_run with int8)
    sha256: dict[str, str] = field(default_factory=dict)       # file name -> sha256
    exporter: str = "torchscript"
    opset: int = DEFAULT_OPSET
    engine_path: Path | None = None
    engine_sidecar: dict[str, Any] | None = None
    triton_dir: Path | None = None
    parity: dict[str, Any] = field(default_factory=dict)       # artifact file name -> ParityReport
    manifest_path: Path | None = None

    @property
    def passed(self) -> bool:
        """True when every parity check that ran passed (and at least one ran)."""
        return bool(self.parity) and all(r.passed for r in self.parity.values())

    def artifacts(self) -> list[Path]:
        return [p for p in (self.onnx_path, self.fp16_path, self.int8_path, self.engine_path) if p is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "onnx": str(self.onnx_path),
            "onnx_fp16": str(self.fp16_path) if self.fp16_path else None,
            "onnx_int8": str(self.int8_path) if self.int8_path else None,
            "engine": str(self.engine_path) if self.engine_path else None,
            "triton": str(self.triton_dir) if self.triton_dir else None,
            "manifest": str(self.manifest_path) if self.manifest_path else None,
            "fingerprint": self.fingerprint, "sha256": dict(self.sha256), "exporter": self.exporter,
            "opset": self.opset, "contract": self.contract,
            "parity": {k: r.to_dict() for k, r in self.parity.items()},
        }


# ---------------------------------------------------------------------------------------------- export graphs
#: modules kept in float32 inside the fp16 backbone: normalisations reduce over many values (mean, variance), the
#: part of a network where fp16 loses what parity measures. A strongly typed TensorRT engine keeps these types.
FP32_KEEP = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.Softmax, nn.LocalResponseNorm)


class _Fp32Island(nn.Module):
    """Runs a keep-listed module in float32 between fp16 neighbours (two Cast nodes in the graph)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


def keep_fp32(module: nn.Module, keep: tuple[type[nn.Module], ...] = FP32_KEEP) -> int:
    """Wrap every ``keep`` module under ``module`` (already halved) in an fp32 island; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, keep):
            setattr(module, name, _Fp32Island(child))
            count += 1
        else:
            count += keep_fp32(child, keep)
    return count


class _Fp16Net(nn.Module):
    """fp16 backbone (its normalisation layers, ``FP32_KEEP``, in float32), fp32 pooling/standardisation/head/
    L2-normalisation; float32 in and out: the typed graph a strongly typed TensorRT engine is built from.

    Mirrors ``EmbeddingNet.forward`` (which already runs its head in float32); parity checks this against it.
    """

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net
        self.net.backbone.half()
        keep_fp32(self.net.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ctxsim.nets.pooling import l2_normalize

        f = self.net.backbone(x.to(torch.float16)).float()
        f = self.net.standardize(self.net.pool(f))
        return l2_normalize(self.net.head(f))


class _Uint8Input(nn.Module):
    """uint8 NHWC pixels (already converted/resized/cropped) -> float NCHW, /255, (x - mean) / std -> the net.

    Same operations, in the same order, as torchvision's ToTensor + Normalize in the eval transform.
    """

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cast first: TensorRT takes UINT8 only as a network input or output (onnx-tensorrt's matrix), and the
        # transpose commutes with the cast, so the numbers are the same
        x = x.to(torch.float32).permute(0, 3, 1, 2) / 255.0
        return self.net((x - self.mean) / self.std)


def _export_module(run_dir: Path, input_format: str, fp16: bool) -> tuple[nn.Module, Any]:
    from ctxsim.nets import load_run

    model, card = load_run(run_dir)  # fresh copy: the fp16 wrapper halves it in place
    net: nn.Module = _Fp16Net(model) if fp16 else model
    if input_format == "uint8_nhwc":
        net = _Uint8Input(net, list(card.preprocess.mean), list(card.preprocess.std))
    return net.eval(), card


def _dummy_input(contract: dict[str, Any], batch: int = 2) -> torch.Tensor:
    shape = [batch, *contract["input_shape"][1:]]
    if contract["input_format"] == "uint8_nhwc":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _torch_to_onnx(net: nn.Module, dummy: torch.Tensor, opset: int,
                   exporter: str = "auto") -> tuple[Any, str, int]:
    """Trace ``net`` to an ONNX ModelProto with a dynamic batch axis; returns (proto, exporter, opset)."""
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        if exporter in ("auto", "torchscript"):
            buf = io.BytesIO()
            try:
                torch.onnx.export(net, (dummy,), buf,  # type: ignore[arg-type]  # it writes to file objects too
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  opset_version=opset, dynamo=False, do_constant_folding=True,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
                return onnx.load_from_string(buf.getvalue()), "torchscript", opset
            except TypeError as e:  # a torch without the TorchScript exporter (no `dynamo` or `dynamic_axes`)
                if exporter == "torchscript":
                    raise MissingDependency(f"this torch has no TorchScript ONNX exporter ({e}); "
                                            "use exporter='dynamo'") from None
                log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", e)
        dyn_opset = max(opset, 18)
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(net, (dummy,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=dyn_opset, dynamo=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        assert program is not None  # dynamo=True returns the program
        return program.model_proto, "dynamo", dyn_opset


def _simplify(proto: Any) -> Any:
    try:
        import onnxslim
    except ImportError:
        raise MissingDependency("ONNX simplification needs onnxslim: pip install 'ctxsim[simplify]' "
                                "(or export without --simplify)") from None
    return onnxslim.slim(proto)


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _finish(proto: Any, contract: dict[str, Any], simplify: bool, what: str) -> bytes:
    """Simplify, attach the contract, check (onnx.checker + the contract's I/O) and serialise one graph."""
    import onnx

    if simplify:
        proto = _simplify(proto)
    out_shape = proto.graph.output[0].type.tensor_type.shape if len(proto.graph.output) == 1 else None
    if out_shape is not None and len(out_shape.dim) == 2 and out_shape.dim[1].dim_param:
        # the tracer loses D through F.normalize's division; it is known: declare it for TensorRT/Triton
        out_shape.dim[1].Clear()
        out_shape.dim[1].dim_value = int(contract["embedding_dim"])
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, contract_to_metadata(contract))
    proto.producer_name = "ctxsim"
    proto.producer_version = str(contract.get("ctxsim_version", ""))
    proto.doc_string = (f"ctxsim embedding model {contract['fingerprint']}: {contract['input_format']} "
                        f"{contract['input_shape']} -> L2-normalised [N, {contract['embedding_dim']}]")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"the exported {what} graph fails onnx.checker ({str(e).splitlines()[0]}); "
                            "nothing was written") from None
    ins = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    outs = list(proto.graph.output)
    want_in = contract["input_shape"]
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        raise ArtifactError(f"the exported {what} graph has inputs {[i.name for i in ins]} and outputs "
                            f"{[o.name for o in outs]}; expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']")
    in_dims, out_dims = _dims(ins[0]), _dims(outs[0])
    if not isinstance(in_dims[0], str) or in_dims[1:] != want_in[1:]:
        raise ArtifactError(f"the exported {what} graph takes {in_dims}, expected [batch, {want_in[1:]}]")
    if len(out_dims) != 2 or out_dims[1] != contract["embedding_dim"] or not isinstance(out_dims[0], str):
        raise ArtifactError(f"the exported {what} graph returns {out_dims}, "
                            f"expected [batch, {contract['embedding_dim']}]")
    data = proto.SerializeToString()
    if len(data) > _MAX_PROTO_BYTES:
        raise ArtifactError(f"the {what} model is over 2 GB, which a single ONNX file cannot hold")
    return data


def read_onnx_contract(path: str | Path) -> dict[str, Any]:
    """The preprocessing contract stored in an ONNX file's metadata (ArtifactError if absent or unreadable)."""
    import onnx

    from ctxsim.export.contract import contract_from_metadata

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any decode failure means a damaged or foreign file
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); "
                            "re-export it with `ctxsim export`") from None
    return contract_from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def export_onnx(run_dir: str | Path, out_dir: str | Path, opset: int | None = DEFAULT_OPSET, fp16: bool = False,
                simplify: bool = False, input_format: str = "float_nchw", exporter: str = "auto") -> ExportResult:
    """Export the run's network (preprocessing-normalised input -> L2-normalised embeddings) to ONNX.

    Writes ``out_dir/model.onnx`` (fp32) and, with ``fp16``, ``out_dir/model.fp16.onnx`` (fp16 backbone, fp32
    head/normalisation, float32 input and output). Input ``"images"`` with a dynamic batch axis and the spatial
    size of ``model.json``; output ``"embeddings"`` [N, D]. ``input_format="uint8_nhwc"`` puts /255 and the
    mean/std normalisation inside the graph (for DeepStream/Jetson pipelines feeding raw pixels). The contract
    (see ``ctxsim.export.contract``) goes into the ONNX ``metadata_props``. ``exporter``: "auto" (TorchScript
    exporter, else dynamo), "torchscript" or "dynamo" (opset >= 18; needs onnxscript).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_input_format(input_format)
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ConfigError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 13 <= opset <= 20:  # the range the TorchScript exporter implements
        raise ConfigError(f"opset must be between 13 and 20, got {opset}")
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("export into a folder of its own, not the run folder (e.g. RUN_DIR/export)")

    files: dict[str, bytes] = {}
    contract: dict[str, Any] = {}
    used_exporter, used_opset = "torchscript", opset
    for name, half in ((ONNX_NAME, False), (ONNX_FP16_NAME, True)) if fp16 else ((ONNX_NAME, False),):
        net, card = _export_module(run_dir, input_format, half)
        c = build_contract(card, input_format, "fp16" if half else "fp32")
        proto, used_exporter, used_opset = _torch_to_onnx(net, _dummy_input(c), opset, exporter)
        c["opset"] = used_opset
        files[name] = _finish(proto, c, simplify, name)
        if not half:
            contract = c
        log.info("exported %s (%s exporter, opset %d, %.1f MB)", name, used_exporter, used_opset,
                 len(files[name]) / 1e6)

    with contextlib.ExitStack() as stack:  # all temporaries written first; replaced together on success
        for name, data in files.items():
            tmp = stack.enter_context(atomic_path(out_dir / name))
            tmp.write_bytes(data)
    sha = {name: sha256_file(out_dir / name) for name in files}
    return ExportResult(out_dir=out_dir, onnx_path=out_dir / ONNX_NAME, contract=contract,
                        fingerprint=contract["fingerprint"], fp16_path=out_dir / ONNX_FP16_NAME if fp16 else None,
                        sha256=sha, exporter=used_exporter, opset=used_opset)

