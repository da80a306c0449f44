"""ONNX export: every backbone family, dynamic batch, normalisation in the graph, contract metadata, uint8 input,
fp16 variant, simplification and atomic writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ctxsim.data.transforms import eval_transform
from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export import export_onnx, open_runner, preprocess_batch, read_onnx_contract
from ctxsim.export.contract import contract_from_metadata
from ctxsim.nets import load_run

from export_helpers import FAMILIES, make_run


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_with_dynamic_batch_and_matches_pytorch(tmp_path, family):
    run = make_run(tmp_path / "run", family)
    result = export_onnx(run, tmp_path / "out")
    model, card = load_run(run)
    runner = open_runner(result.onnx_path)

    proto = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("images", "embeddings")
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    c, s = card.preprocess.num_channels, card.preprocess.input_size
    assert isinstance(in_dims[0], str) and in_dims[1:] == [c, s, s]  # dynamic batch, fixed spatial size
    assert isinstance(out_dims[0], str) and out_dims[1] == 64

    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 64):
        x = torch.randn(n, c, s, s, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = runner.run(x.numpy())
        assert got.shape == (n, 64) and got.dtype == np.float32
        assert _cos(ref, got).min() > 0.9999, family
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2 normalisation in the graph


def test_metadata_round_trips(convnet_export, convnet_run):
    _, card = load_run(convnet_run)
    contract = read_onnx_contract(convnet_export.onnx_path)
    assert contract == convnet_export.contract
    assert open_runner(convnet_export.onnx_path).contract == contract
    assert contract["fingerprint"] == card.fingerprint == convnet_export.fingerprint
    assert contract["embedding_dim"] == 64
    assert contract["precision"] == "fp32" and contract["opset"] == 17
    for key in ("input_size", "resize_size", "mean", "std", "channels", "interpolation"):
        want = card.preprocess.to_dict()[key]
        assert contract[key] == want, key
    assert contract["input_format"] == "float_nchw" and contract["resize"] == "shorter_side_then_center_crop"
    proto = onnx.load(str(convnet_export.onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ctxsim.fingerprint"] == card.fingerprint and meta["ctxsim.channels"] == "L"
    assert contract_from_metadata(meta) == contract
    assert read_onnx_contract(convnet_export.fp16_path)["precision"] == "fp16"


def test_preprocess_batch_is_the_eval_transform(omniglot_images, large_drawings, convnet_export):
    contract = convnet_export.contract
    images = omniglot_images[:3] + large_drawings[:2]  # 28 px (no resize) and 105 px (resized to 28)
    got = preprocess_batch(images, contract)
    tf = eval_transform(contract_preprocess_dict(contract))
    want = torch.stack([tf(im) for im in images]).numpy()
    assert got.dtype == np.float32 and got.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(got, want)
    raw = preprocess_batch(images, {**contract, "input_format": "uint8_nhwc"})
    assert raw.dtype == np.uint8 and raw.shape == (5, 28, 28, 1)
    assert preprocess_batch([], contract).shape == (0, 1, 28, 28)


def contract_preprocess_dict(contract):
    return {k: contract[k] for k in ("input_size", "resize_size", "mean", "std", "channels", "interpolation")}


@pytest.mark.parametrize("family", ["convnet", "mobilenet_v3_small"])  # greyscale "L" (C=1) and RGB
def test_uint8_nhwc_graph_equals_float_graph(tmp_path, family, omniglot_images, large_drawings):
    run = make_run(tmp_path / "run", family)
    f = open_runner(export_onnx(run, tmp_path / "float").onnx_path)
    u = open_runner(export_onnx(run, tmp_path / "uint8", input_format="uint8_nhwc").onnx_path)
    assert u.contract["input_format"] == "uint8_nhwc" and u.contract["input_dtype"] == "uint8"
    c = 1 if family == "convnet" else 3
    assert u.contract["input_shape"][1:] == [f.contract["input_size"]] * 2 + [c]

    images = omniglot_images[:8] + large_drawings[:8]
    raw = preprocess_batch(images, u.contract)
    assert raw.dtype == np.uint8 and raw.shape[-1] == c
    on_float = f.run(preprocess_batch(images, f.contract))
    on_raw = u.run(raw)
    np.testing.assert_allclose(on_raw, on_float, atol=2e-5)
    assert _cos(on_raw, on_float).min() > 0.99999


def test_fp16_variant_keeps_float32_io(convnet_export, convnet_run):
    proto = onnx.load(str(convnet_export.fp16_path))
    f32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)  # weights are fp16
    model, _ = load_run(convnet_run)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    got = open_runner(convnet_export.fp16_path).run(x.numpy())
    assert got.dtype == np.float32 and _cos(ref, got).min() > 0.999


def _input_types(proto) -> list[tuple[str, int]]:
    """(op_type, element type of the node's first input) for every node, by ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return [(n.op_type, types.get(n.input[0], 0)) for n in g.node if n.input]


@pytest.mark.parametrize("keep", [True, False])
def test_fp16_graph_is_typed_with_normalisations_in_float32(tmp_path, monkeypatch, keep):
    """The fp16 file is what a strongly typed TensorRT engine is built from, so its types are the engine's: convs
    in fp16, every LayerNorm (here timm ConvNeXt's 16 inside the backbone, and the head's) and the L2
    normalisation in float32. Without the keep-list the backbone's LayerNorms are fp16, and the check sees it."""
    import ctxsim.export.onnx_export as onnx_export
    from ctxsim.data.transforms import Preprocess
    from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

    if not keep:
        monkeypatch.setattr(onnx_export, "FP32_KEEP", ())
        monkeypatch.setattr(onnx_export, "keep_fp32", lambda module, keep=(): 0)
    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="timm:convnext_atto", pretrained=None, embedding_dim=32, pooling="max",
                                 frozen_bn=False))
    save_model(tmp_path / "run", net, Preprocess.imagenet(64, 64))
    result = export_onnx(tmp_path / "run", tmp_path / "out", fp16=True)
    ops = _input_types(onnx.load(str(result.fp16_path)))
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert {t for op, t in ops if op == "Conv"} == {f16}
    layer_norms = [t for op, t in ops if op == "LayerNormalization"]
    assert len(layer_norms) == 17
    assert [t for op, t in ops if op == "ReduceL2"] == [f32]
    if keep:
        assert set(layer_norms) == {f32}
    else:
        assert layer_norms.count(f16) == 16  # the planted defect: the same check fails on it


def test_simplify_with_onnxslim_keeps_outputs_and_metadata(tmp_path, convnet_run, convnet_export):
    result = export_onnx(convnet_run, tmp_path / "slim", simplify=True)
    assert read_onnx_contract(result.onnx_path) == convnet_export.contract
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    a = open_runner(result.onnx_path).run(x)
    b = open_runner(convnet_export.onnx_path).run(x)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_simplify_without_onnxslim_is_missing_dependency(tmp_path, convnet_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import fails
    with pytest.raises(MissingDependency, match=r"pip install 'ctxsim\[simplify\]'"):
        export_onnx(convnet_run, tmp_path / "x", simplify=True)
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_failed_export_keeps_previous_artifacts_and_leaves_no_temp_files(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "convnet", seed=0)
    out = tmp_path / "out"
    export_onnx(run, out)
    before = (out / "model.onnx").read_bytes()
    make_run(tmp_path / "run", "convnet", seed=1)  # new weights: a successful export would change model.onnx

    calls = {"n": 0}
    real_check = onnx.checker.check_model

    def check_fails_on_second_graph(proto, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the fp32 graph passed and is ready; the fp16 one fails
            raise onnx.checker.ValidationError("injected failure")
        return real_check(proto, *a, **kw)

    monkeypatch.setattr(onnx.checker, "check_model", check_fails_on_second_graph)
    with pytest.raises(ArtifactError, match="nothing was written"):
        export_onnx(run, out, fp16=True)
    assert calls["n"] == 2
    assert (out / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # no fp16 file, no .tmp leftovers

    monkeypatch.setattr(onnx.checker, "check_model", real_check)
    export_onnx(run, out, fp16=True)
    assert (out / "model.onnx").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["model.fp16.onnx", "model.onnx"]


def test_export_rejects_bad_options(tmp_path, convnet_run):
    with pytest.raises(ConfigError, match="input_format"):
        export_onnx(convnet_run, tmp_path / "o", input_format="nhwc")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(convnet_run, tmp_path / "o", opset=7)
    with pytest.raises(ConfigError, match="folder of its own"):
        export_onnx(convnet_run, convnet_run)
    with pytest.raises(ArtifactError, match="not a run folder"):
        export_onnx(tmp_path / "nothing", tmp_path / "o")


def test_dynamo_exporter_fallback_path_gives_the_same_model(tmp_path, convnet_run, convnet_export):
    result = export_onnx(convnet_run, tmp_path / "dyn", exporter="dynamo")
    assert result.exporter == "dynamo" and result.opset >= 18
    assert convnet_export.exporter == "torchscript" and convnet_export.opset == 17
    contract = read_onnx_contract(result.onnx_path)
    assert contract["opset"] == result.opset and contract["fingerprint"] == convnet_export.fingerprint
    model, _ = load_run(convnet_run)
    for n in (1, 5):
        x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model(x).numpy()
        assert _cos(ref, open_runner(result.onnx_path).run(x.numpy())).min() > 0.9999
    with pytest.raises(ConfigError, match="exporter"):
        export_onnx(convnet_run, tmp_path / "x", exporter="jit")
