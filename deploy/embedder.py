"""One embedder over PyTorch, ONNX Runtime and TensorRT: recorded preprocessing, a runner, batching.

``Embedder.from_artifact(path)`` picks the backend from the artifact (``ctxsim.export.runners.resolve_artifact``):

- a run folder (``model.json`` + ``model.safetensors``) -> PyTorch (``ctxsim.nets.load_run``), preprocessed with
  ``ctxsim.data.transforms.eval_transform(card.preprocess)``, the code evaluation uses; ``precision`` "bf16"
  (CUDA or CPU) or "fp16" (CUDA) puts the backbone in that type and channels_last, the head staying float32;
  optional ``torch.compile`` (on CUDA ``mode="max-autotune"``: autotuned kernels replayed as CUDA graphs, the
  fastest PyTorch path, see benchmarks/gpu_inference.py; a batch of 2 or more is padded to ``batch_size``, so
  the graphs are built for two shapes: 1 and ``batch_size``);
- a ``.onnx`` file (or an export folder holding ``model.onnx``) -> ONNX Runtime through
  ``ctxsim.export.runners.open_runner``, preprocessed with ``ctxsim.export.contract.preprocess_batch`` and the
  runner's contract;
- a ``.engine`` / ``.plan`` / ``.trt`` file -> the TensorRT runner of ``ctxsim.export``.

Threads: opening an Embedder applies ``ctxsim.deploy.threads``'s policy (PyTorch, ONNX Runtime without spin-waiting,
FAISS/OpenMP; ``threads=N``, default the usable cores) the first time in a process or whenever ``threads`` is
given; ``.threads`` is the policy its sessions were opened with.

``open_index_model(info, model)`` is the Embedder of an index: ``model`` or the one index.json names, refused
(FingerprintMismatch) when it is not the model that built the index.

``embed(images)`` takes PIL images, paths or encoded bytes and returns float32 [N, D] L2-normalised embeddings;
a NaN or infinite embedding raises NonFiniteEmbedding (never an empty search result downstream).

Opening checks the bytes: a run folder's weights against model.json (``ctxsim.nets.load_run``), an export
artifact against the manifest.json beside it (``ctxsim.export.manifest.check_artifact``); a mismatch is refused.
``.fingerprint`` is the model's fingerprint (the index refuses queries from another model), ``.dim`` the
embedding size, ``.backend`` a short name ("torch:cpu", "onnxruntime:CPUExecutionProvider", "tensorrt", ...).

Optional JPEG decoding on the device (``device_decode=True``, torch backend): ``embed_files`` reads JPEG files
as bytes and decodes each batch in one call on the model's device (nvJPEG on CUDA; libjpeg-turbo on the CPU),
then resizes and crops there (``ctxsim.data.device_decode.DeviceEvalTransform``); other formats, and JPEGs
Pillow sees as neither greyscale nor RGB (CMYK), take the Pillow path. The antialiased tensor resize is close to,
but not bit-identical with, Pillow's; leave it off where exact parity with evaluation matters.
"""
from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctxsim.data.device_decode import JPEG_SUFFIXES
from ctxsim.data.images import image_errors
from ctxsim.data.transforms import Preprocess, eval_transform
from ctxsim.deploy.gallery import load_image
from ctxsim.deploy.threads import ThreadPolicy, ensure_threads, ort_session_config
from ctxsim.errors import ArtifactError, ConfigError, DataError, MissingDependency, NonFiniteEmbedding
from ctxsim.export.contract import contract_preprocess, preprocess_batch
from ctxsim.export.manifest import check_artifact
from ctxsim.export.runners import open_runner, resolve_artifact

__all__ = ["Embedder", "as_embedder", "open_index_model", "resolve_device"]

logger = logging.getLogger(__name__)

def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when CUDA is available, else "cpu"; "cuda"/"cuda:N"/"cpu" are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        return device
    if device != "cpu":
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


# ---------------------------------------------------------------------------------------------- backends
def set_precision(model: torch.nn.Module, precision: str) -> torch.dtype:
    """bf16/fp16: put the backbone and pooling (weights and activations) in that type and channels_last, in place;
    the head stays float32, as EmbeddingNet defines it. No per-call autocast casts. Returns the input dtype."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype != torch.float32:
        for part in (model.backbone, model.pool):
            part.to(dtype=dtype)
            part.to(memory_format=torch.channels_last)
    return dtype


def compile_for_inference(model: torch.nn.Module, device: torch.device | str,
                          conv_backends: str = "ATEN") -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile for serving a model in eval mode under no_grad/inference_mode. On CUDA: Inductor's
    max-autotune options (autotuned kernels replayed as CUDA graphs) plus freezing (weights as constants, BatchNorm
    folded into the convolutions), convolutions tuned over ``conv_backends`` only (Triton conv templates add
    minutes of tuning for little gain); minutes of tuning per batch shape, once. On the CPU: the default mode.
    benchmarks/gpu_inference.py measures exactly this against eager."""
    if torch.device(device).type != "cuda":
        return torch.compile(model, dynamic=False)
    import torch._inductor as inductor
    import torch._inductor.config as inductor_config

    options = {**inductor.list_mode_options("max-autotune"), "freezing": True}
    if hasattr(inductor_config, "max_autotune_conv_backends"):
        options["max_autotune_conv_backends"] = conv_backends
    return torch.compile(model, dynamic=False, options=options)


class _TorchBackend:
    def __init__(self, run_dir: Path, device: str, compile: bool | str, batch_size: int, precision: str) -> None:
        from ctxsim.nets import load_run

        model, card = load_run(run_dir)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.card = card
        self.preprocess_spec = card.preprocess
        self.transform = eval_transform(card.preprocess)
        self.fingerprint = card.fingerprint
        self.dim = card.embedding_dim
        self.batch_size = batch_size
        if precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 for the torch backend needs CUDA; use fp32 or bf16")
        self.dtype = set_precision(self.model, precision)  # bf16/fp16 inputs go channels_last, as the backbone
        self.precision = precision
        self.compiled = False
        self.pad = False
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if compile:
            try:
                self._forward = (torch.compile(self.model, mode=compile, dynamic=False) if isinstance(compile, str)
                                 else compile_for_inference(self.model, self.device))
            except Exception as e:  # noqa: BLE001 - compile is an optimisation; say why it is off
                raise ConfigError(f"torch.compile failed ({type(e).__name__}: {e}); run without compile") from None
            self.compiled, self.pad = True, True  # batches padded to batch_size (see run), so graphs are reused
        self.name = (f"torch:{self.device.type}" + ("" if precision == "fp32" else f":{precision}")
                     + (":compiled" if self.compiled else ""))
        self.contract = {**card.preprocess.to_dict(), "input_format": "float_nchw",
                         "fingerprint": card.fingerprint, "embedding_dim": card.embedding_dim}

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images])

    @torch.inference_mode()
    def run(self, batch: Any) -> np.ndarray:
        x = torch.as_tensor(batch)
        n = x.shape[0]
        # two static shapes for compiled graphs / CUDA graphs: one image (a lone request's latency) and a full batch
        if self.pad and 1 < n < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        x = x.to(self.device, non_blocking=True)
        if self.dtype != torch.float32:
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        y = self._forward(x)
        return y[:n].float().cpu().numpy()


class _RunnerBackend:
    """ONNX Runtime or TensorRT through ``ctxsim.export``'s runner and preprocessing contract."""

    def __init__(self, path: Path, kind: str, device: str, policy: ThreadPolicy | None = None) -> None:
        check_artifact(path)  # bytes other than the manifest beside it records: refused before they are run
        try:
            runner = open_runner(path, device=device, session_config=ort_session_config(policy))
        except MissingDependency:
            raise
        except ImportError as e:  # the TensorRT runner imports tensorrt / cuda bindings
            raise MissingDependency(f"{kind} artifacts need {e.name or 'TensorRT'}: pip install 'ctxsim[trt]' "
                                    "(on Jetson: TensorRT from JetPack)") from None
        self.runner = runner
        self.contract = dict(runner.contract)
        self.name = str(getattr(runner, "name", kind))
        self.fingerprint = str(self.contract.get("fingerprint") or "")
        if not self.fingerprint:
            raise ArtifactError(f"{path} records no model fingerprint; re-export it with `ctxsim export`")
        dim = self.contract.get("embedding_dim")
        self.dim = int(dim) if dim else None
        self.preprocess_spec = contract_preprocess(self.contract)

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return preprocess_batch(images, self.contract)

    def run(self, batch: Any) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.numpy()
        return np.asarray(self.runner.run(batch), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- embedder
def _jpeg_bytes(path: str | os.PathLike) -> torch.Tensor | None:
    """A JPEG file's bytes (checked by Pillow's header parser: decompression-bomb limit, colour mode), or None when
    the file should take the Pillow path (another format, CMYK). DataError when it cannot be read."""
    if not str(path).lower().endswith(JPEG_SUFFIXES):
        return None
    with image_errors(str(path)):
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # header only: no pixels decoded
            if im.format != "JPEG" or im.mode not in ("L", "RGB"):
                return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class Embedder:
    """Embeds images with one model artifact; see the module docstring."""

    def __init__(self, backend: Any, kind: str, artifact: Path, batch_size: int = 64,
                 device_decode: bool = False, threads: ThreadPolicy | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._b = backend
        self.kind = kind
        self.artifact = artifact
        self.batch_size = int(batch_size)
        self.fingerprint: str = backend.fingerprint
        self.backend: str = backend.name
        self.contract: dict = backend.contract
        self.preprocess_spec: Preprocess = backend.preprocess_spec
        self._dim: int | None = backend.dim
        self.threads: ThreadPolicy | None = threads
        self._device_transform = None
        if device_decode:
            if kind != "torch":
                raise ConfigError(f"device_decode needs the torch backend (a run folder), not {kind}: ONNX Runtime "
                                  "and TensorRT take host arrays")
            from ctxsim.data.device_decode import DeviceEvalTransform

            self._device_transform = DeviceEvalTransform(backend.preprocess_spec, backend.device)

    @property
    def device_decode(self) -> bool:
        """Whether ``embed_files`` decodes JPEGs on the model's device."""
        return self._device_transform is not None

    @classmethod
    def from_artifact(cls, path: str | os.PathLike, device: str = "auto", compile: bool | str = False,
                      batch_size: int = 64, precision: str = "fp32", device_decode: bool = False,
                      threads: int | None = None) -> Embedder:
        """Open a run folder (PyTorch), a .onnx file / export folder (ONNX Runtime) or an engine (TensorRT).
        ``threads``: apply the thread policy for that many threads (``ctxsim.deploy.threads``; None: the policy in
        force, or the default one if none was applied yet). ``triton://host:port/NAME``: a model Triton serves
        (ctxsim.deploy.embedder_triton; never run against a server here)."""
        from ctxsim.deploy.embedder_triton import TritonBackend, is_triton_url

        if is_triton_url(path):
            if device_decode or compile or precision != "fp32":
                raise ConfigError("a triton:// model runs on the server: no --device-decode, --compile or precision")
            tb = TritonBackend(str(path))
            return cls(tb, "triton", Path(tb.canonical), batch_size, False, ensure_threads(threads))
        kind, p = resolve_artifact(Path(path))
        dev = resolve_device(device)
        policy = ensure_threads(threads)
        backend: _TorchBackend | _RunnerBackend
        if kind == "torch":
            backend = _TorchBackend(p, dev, compile, batch_size, precision)
        else:
            if precision != "fp32":
                raise ConfigError(f"precision applies to run folders (PyTorch); {kind} artifacts have their precision "
                                  "built in (model.fp16.onnx, an fp16/int8 engine)")
            if compile:
                logger.info("compile applies to the torch backend only; ignored for %s", kind)
            backend = _RunnerBackend(p, kind, dev, policy)
        return cls(backend, kind, p, batch_size, device_decode, policy)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        if self._dim is None:  # contract without it: ask the model once
            self._dim = int(self.embed([Image.new(self.preprocess_spec.channels, (8, 8))]).shape[1])
        return self._dim

    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        """Decoded images -> the backend's input batch (exactly the artifact's recorded preprocessing)."""
        return self._b.preprocess(list(images))

    def run(self, batch: Any) -> np.ndarray:
        """An already preprocessed batch -> float32 [N, D] (no batching; used by benchmarks)."""
        return self._b.run(batch)

    def embed(self, images: Iterable[Any], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """PIL images, paths or encoded bytes -> float32 [N, D], in ``batch_size`` batches.

        Raises DataError naming the first unreadable image (galleries skip those before calling this).
        """
        items = list(images)
        total = len(items)
        out: list[np.ndarray] = []
        for start in range(0, total, self.batch_size):
            chunk = items[start:start + self.batch_size]
            out.append(self._b.run(self._b.preprocess([load_image(x) for x in chunk])))
            if progress is not None:
                progress(start + len(chunk), total)
        if not out:
            dim = self._dim if self._dim is not None else 0
            return np.zeros((0, dim), dtype=np.float32)
        emb = self._finite(np.ascontiguousarray(np.concatenate(out), dtype=np.float32))
        if self._dim is None:
            self._dim = int(emb.shape[1])
        return emb

    def _finite(self, emb: np.ndarray) -> np.ndarray:
        """``emb``, or NonFiniteEmbedding naming how many rows hold NaN or inf."""
        bad = ~np.isfinite(emb).all(axis=1) if emb.ndim == 2 else np.zeros(0, bool)
        if bad.any():
            rows = np.flatnonzero(bad).tolist()
            raise NonFiniteEmbedding(
                f"{self.backend} model {self.fingerprint} returned NaN or infinite embeddings for {len(rows)} of "
                f"{len(emb)} image(s); its weights may be damaged (check with `ctxsim verify {self.artifact}`)",
                emb, rows)
        return emb

    def embed_files(self, paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """Embed image files, skipping unreadable ones: (float32 [M, D], the M positions embedded,
        [(path, reason)] skipped). JPEGs are decoded on the device when ``device_decode`` is on."""
        from ctxsim.deploy.gallery import load_images

        if self._device_transform is None:
            images, positions, unreadable = load_images(paths)
            return self.embed(images), positions, unreadable
        rows: dict[int, torch.Tensor] = {}
        bad: list[tuple[str, str]] = []
        jpegs: list[tuple[int, torch.Tensor]] = []
        for i, path in enumerate(paths):
            try:
                data = _jpeg_bytes(path)
                if data is None:  # not a JPEG we decode on the device: Pillow
                    rows[i] = self._b.transform(load_image(path))
                else:
                    jpegs.append((i, data))
            except DataError as e:
                bad.append((str(path), str(e)))
        for start in range(0, len(jpegs), self.batch_size):
            part = jpegs[start:start + self.batch_size]
            try:
                rows.update(zip((i for i, _ in part), self._device_transform([d for _, d in part])))
            except DataError:  # find the culprit(s): one at a time
                for i, d in part:
                    try:
                        rows[i] = self._device_transform([d])[0]
                    except DataError as e:
                        bad.append((str(paths[i]), f"cannot decode {paths[i]}: {e.__cause__ or e}"))
        ok = sorted(rows)
        if not ok:
            return np.zeros((0, self._dim or 0), dtype=np.float32), ok, bad
        dev = self._b.device
        out = [self._b.run(torch.stack([rows[i].to(dev) for i in ok[s:s + self.batch_size]]))
               for s in range(0, len(ok), self.batch_size)]
        return self._finite(np.ascontiguousarray(np.concatenate(out), dtype=np.float32)), ok, bad

    def warm_up(self) -> None:
        """Run a lone image and a full batch once, so that a compiled model builds (and tunes) its graphs for both
        shapes now rather than on the first requests."""
        blank = Image.new(self.preprocess_spec.channels, (self.preprocess_spec.input_size,) * 2)
        self.embed([blank])
        self.embed([blank] * max(2, self.batch_size))

    def time_batch(self, batch: Any, repeats: int = 10) -> list[float]:
        """Seconds per call of ``run(batch)`` over ``repeats`` calls (after one warm-up call)."""
        self._b.run(batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._b.run(batch)
            times.append(time.perf_counter() - t0)
        return times

    def __repr__(self) -> str:
        return f"Embedder(backend={self.backend!r}, fingerprint={self.fingerprint!r}, artifact={str(self.artifact)!r})"


# ---------------------------------------------------------------------------------------------- an index's model
def as_embedder(model: Any, batch_size: int = 64, device_decode: bool = False,
                opener: Callable[[Any], Any] | None = None) -> Any:
    """``model`` itself when it is an Embedder (anything with ``.embed`` and ``.fingerprint``), else the Embedder
    of the artifact path it names: ``opener(model)``, or ``Embedder.from_artifact`` with ``batch_size`` and
    ``device_decode``."""
    if hasattr(model, "embed") and hasattr(model, "fingerprint"):
        if device_decode and not getattr(model, "device_decode", False):
            raise ConfigError("device_decode is set when the Embedder is opened: "
                              "Embedder.from_artifact(..., device_decode=True)")
        return model
    if model is None:
        raise ConfigError("no model given; pass a run folder, a .onnx file or a TensorRT engine")
    if opener is not None:
        return opener(model)
    return Embedder.from_artifact(model, batch_size=batch_size, device_decode=device_decode)


def open_index_model(info: Any, model: Any = None, batch_size: int = 64, device_decode: bool = False,
                     opener: Callable[[Any], Any] | None = None) -> Any:
    """The Embedder that queries (or extends) the index described by ``info`` (an ``IndexInfo``): ``model`` (an
    Embedder or an artifact path, see :func:`as_embedder`), by default the model index.json names. ConfigError
    when that model is not here; FingerprintMismatch when the model is not the one that built the index."""
    from ctxsim.deploy.index import check_fingerprint

    if model is None:
        ref = info.model
        from ctxsim.deploy.embedder_triton import is_triton_url

        if not ref or not (Path(ref).exists() or is_triton_url(ref)):
            raise ConfigError(f"the model that built the index ({ref}) is not available here; pass it with "
                              "--model (model=...)")
        model = ref
    embedder = as_embedder(model, batch_size, device_decode, opener)
    check_fingerprint(info.fingerprint, embedder.fingerprint)
    return embedder
