"""The Embedder: backends, recorded preprocessing, batching."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxsim.deploy import Embedder
from ctxsim.errors import ArtifactError, ConfigError, CtxsimError, MissingDependency
from ctxsim.export.runners import resolve_artifact


def _paths(gallery_dir, n=40):
    return sorted(gallery_dir.rglob("*.png"))[:n]


def test_torch_backend_matches_evaluation_preprocessing(run_dir, gallery_dir):
    import torch

    from ctxsim.data.datasets import ImageFolderDataset
    from ctxsim.data.transforms import eval_transform
    from ctxsim.embed import embed_dataset
    from ctxsim.nets import load_run

    e = Embedder.from_artifact(run_dir, device="cpu", batch_size=16)
    assert e.backend == "torch:cpu" and e.dim == 64 and len(e.fingerprint) == 16
    paths = _paths(gallery_dir)
    a = e.embed(paths)
    assert a.dtype == np.float32 and a.shape == (len(paths), 64)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    b = e.embed([Image.open(p) for p in paths])
    np.testing.assert_array_equal(a, b)
    model, card = load_run(run_dir)
    ds = ImageFolderDataset(gallery_dir, transform=eval_transform(card.preprocess))
    ref, _ = embed_dataset(model, ds, batch_size=64)
    order = {p: i for i, p in enumerate(ds.paths)}
    np.testing.assert_allclose(a, ref[[order[str(p)] for p in paths]], atol=1e-5)
    assert e.embed([]).shape == (0, 64)
    with torch.no_grad():
        assert e.run(e.preprocess([Image.open(paths[0])])).shape == (1, 64)


def test_artifact_kinds(tmp_path, run_dir):
    assert resolve_artifact(run_dir) == ("torch", run_dir)
    (tmp_path / "m.onnx").write_bytes(b"")
    assert resolve_artifact(tmp_path / "m.onnx")[0] == "onnx"
    (tmp_path / "m.engine").write_bytes(b"")
    assert resolve_artifact(tmp_path / "m.engine")[0] == "tensorrt"
    with pytest.raises(ArtifactError, match="neither a run folder"):
        resolve_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        resolve_artifact(tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match="CUDA"):
        Embedder.from_artifact(run_dir, device="cpu", precision="fp16")


def test_torch_and_onnx_backends_agree(tmp_path, run_dir, gallery_dir):
    try:
        from ctxsim.export.onnx_export import export_onnx
    except ImportError as e:
        pytest.skip(f"ctxsim.export.export_onnx is not importable yet ({e})")
    result = export_onnx(run_dir, tmp_path / "export")
    paths = _paths(gallery_dir, 70)
    t = Embedder.from_artifact(run_dir, device="cpu").embed(paths)
    o_emb = Embedder.from_artifact(result.onnx_path, device="cpu", batch_size=32)
    assert o_emb.backend.startswith("onnxruntime") and o_emb.fingerprint == Embedder.from_artifact(run_dir).fingerprint
    o = o_emb.embed(paths)
    assert o.shape == t.shape and o_emb.dim == 64
    assert float((t * o).sum(axis=1).min()) > 0.9999
    folder = Embedder.from_artifact(tmp_path / "export")  # an export folder means its model.onnx
    assert folder.backend.startswith("onnxruntime")


def test_tensorrt_engine_needs_tensorrt(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    from ctxsim.errors import CtxsimError

    (tmp_path / "model.fp16.engine").write_bytes(b"\0" * 16)
    with pytest.raises(CtxsimError):
        Embedder.from_artifact(tmp_path / "model.fp16.engine", device="cpu")


def test_upper_case_onnx_and_trt_engine_take_their_backends(tmp_path, run_dir, gallery_dir):
    """The Embedder asks export's resolver: MODEL.ONNX is an ONNX model, a .trt file a TensorRT engine."""
    from ctxsim.export.onnx_export import export_onnx

    onnx = export_onnx(run_dir, tmp_path / "export", fp16=False).onnx_path
    upper = tmp_path / "upper" / "MODEL.ONNX"
    upper.parent.mkdir()
    upper.write_bytes(onnx.read_bytes())
    e = Embedder.from_artifact(upper, device="cpu")
    assert e.kind == "onnx" and e.backend == "onnxruntime:CPUExecutionProvider"
    paths = _paths(gallery_dir, 8)
    np.testing.assert_array_equal(e.embed(paths), Embedder.from_artifact(onnx, device="cpu").embed(paths))
    (tmp_path / "model.fp16.trt").write_bytes(b"\0" * 16)
    with pytest.raises(CtxsimError) as e:  # refused on the TensorRT path, not as an unknown kind of file
        Embedder.from_artifact(tmp_path / "model.fp16.trt", device="cpu")
    assert "ctxsim can run" not in str(e.value)  # what an unknown kind of file is told
    if importlib.util.find_spec("tensorrt") is None:
        assert isinstance(e.value, MissingDependency) and "pip install 'ctxsim[trt]'" in str(e.value)


def test_torch_compile_matches_eager(run_dir, gallery_dir):  # ~20 s with a cold Inductor cache
    paths = _paths(gallery_dir, 40)
    eager = Embedder.from_artifact(run_dir, device="cpu").embed(paths)
    compiled = Embedder.from_artifact(run_dir, device="cpu", compile=True, batch_size=32)
    assert compiled.backend.endswith(":compiled")
    seen = []
    forward = compiled._b._forward
    compiled._b._forward = lambda x: (seen.append(x.shape[0]), forward(x))[1]
    out = compiled.embed(paths)  # 40 = 32 + 8: the last batch is padded to the compiled shape
    assert float((out * eager).sum(axis=1).min()) > 0.9999
    one = compiled.embed(paths[5:6])  # a lone image runs as a batch of 1 (latency), not padded to 32
    three = compiled.embed(paths[:3])
    assert seen == [32, 32, 1, 32]
    compiled.warm_up()  # what serve --compile runs before serving: both shapes once
    assert seen[4:] == [1, 32]
    assert float((one * eager[5]).sum()) > 0.9999 and float((three * eager[:3]).sum(1).min()) > 0.9999


@pytest.fixture(scope="module")
def jpeg_gallery(tmp_path_factory, gallery_dir):
    """30 real Omniglot drawings saved as JPEG, plus the awkward cases: a PNG, a CMYK JPEG, a JPEG cut short
    (its header reads, its pixels do not: the device batch fails) and a file that is no JPEG at all."""
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, png in enumerate(sorted(gallery_dir.rglob("*.png"))[:30]):
        with Image.open(png) as im:
            im.convert("L").save(root / f"{i:02d}.jpg", quality=92)
        paths.append(root / f"{i:02d}.jpg")
    with Image.open(paths[3]) as im:
        im.convert("CMYK").save(root / "cmyk.jpg")
    data = paths[4].read_bytes()
    (root / "broken.jpg").write_bytes(data[:len(data) * 6 // 10])
    (root / "junk.jpg").write_bytes(b"not a jpeg at all")
    odd = [sorted(gallery_dir.rglob("*.png"))[40], root / "cmyk.jpg", root / "broken.jpg"]
    return paths[:10] + odd + paths[10:20] + [root / "junk.jpg"] + paths[20:]


def test_device_decode_embeds_files_like_pillow(run_dir, jpeg_gallery):
    """JPEGs decoded as tensors (libjpeg-turbo here, nvJPEG on a GPU) give the Pillow path's embeddings up to
    resampling rounding; a PNG and a CMYK JPEG take the Pillow path; unreadable files are skipped and named."""
    pil = Embedder.from_artifact(run_dir, device="cpu", batch_size=8)
    dev = Embedder.from_artifact(run_dir, device="cpu", batch_size=8, device_decode=True)
    assert dev.device_decode and not pil.device_decode
    a, ok_a, bad_a = pil.embed_files(jpeg_gallery)
    b, ok_b, bad_b = dev.embed_files(jpeg_gallery)
    unreadable = [i for i, p in enumerate(jpeg_gallery) if p.name in ("broken.jpg", "junk.jpg")]
    assert ok_a == ok_b == [i for i in range(len(jpeg_gallery)) if i not in unreadable]
    assert sorted(p for p, _ in bad_b) == sorted(p for p, _ in bad_a) == sorted(str(jpeg_gallery[i])
                                                                               for i in unreadable)
    assert all(Path(p).name in reason for p, reason in bad_b)  # each reason names its file
    cos = (a * b).sum(1)
    assert a.shape == b.shape == (len(jpeg_gallery) - 2, 64)
    assert cos.min() > 0.995, cos.min()  # resampling differs slightly; a wrong crop or layout would not be close
    for j, p in enumerate(jpeg_gallery):  # the PNG and the CMYK JPEG take the Pillow path in both: identical
        if p.suffix == ".png" or p.name == "cmyk.jpg":
            np.testing.assert_allclose(a[ok_b.index(j)], b[ok_b.index(j)], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_device_decode_needs_the_torch_backend(tmp_path, run_dir, jpeg_gallery):
    from ctxsim.deploy import build_index
    from ctxsim.export import export_onnx

    onnx = export_onnx(run_dir, tmp_path / "exp").onnx_path
    with pytest.raises(ConfigError, match="torch backend"):
        Embedder.from_artifact(onnx, device="cpu", device_decode=True)
    with pytest.raises(ConfigError, match="precision built in"):
        Embedder.from_artifact(onnx, device="cpu", precision="bf16")
    with pytest.raises(ConfigError, match="device_decode"):
        build_index(jpeg_gallery, Embedder.from_artifact(run_dir, device="cpu"), tmp_path / "i", device_decode=True)
    info = build_index(jpeg_gallery, run_dir, tmp_path / "idx", device_decode=True)
    assert info.count == len(jpeg_gallery) - 2 and sorted(Path(p).name for p, _ in info.skipped) == [
        "broken.jpg", "junk.jpg"]


def test_bf16_backbone_on_the_cpu(run_dir, gallery_dir):
    """precision="bf16": the backbone runs in bfloat16 (channels_last), the head in float32; embeddings stay close
    to fp32 and unit-norm. fp16 is refused on the CPU."""
    import torch

    paths = _paths(gallery_dir, 24)
    ref = Embedder.from_artifact(run_dir, device="cpu").embed(paths)
    e = Embedder.from_artifact(run_dir, device="cpu", precision="bf16", batch_size=8)
    assert e.backend == "torch:cpu:bf16"
    assert next(e._b.model.backbone.parameters()).dtype == torch.bfloat16
    assert next(e._b.model.head.parameters()).dtype == torch.float32
    got = e.embed(paths)
    assert got.dtype == np.float32
    cos = (got * ref).sum(1)
    assert cos.min() > 0.99 and cos.min() < 1 - 1e-7, cos.min()  # close, and really computed in bf16
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="fp16 for the torch backend needs CUDA"):
        Embedder.from_artifact(run_dir, device="cpu", precision="fp16")
