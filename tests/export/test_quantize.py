"""int8 ONNX by ONNX Runtime static quantisation, judged by parity at the int8 thresholds on real images."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from ctxsim.errors import ConfigError
from ctxsim.export import check_parity, open_runner, quantize_onnx, read_onnx_contract
from ctxsim.export.contract import preprocess_batch
from ctxsim.export.quantize import calibration_batches, image_batches, list_images, run_calibration_images

LIMIT = 400


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory, convnet_run, convnet_export):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    images = run_calibration_images(convnet_run, limit=128)
    return quantize_onnx(convnet_export.onnx_path, image_batches(images, convnet_export.contract), out_path=out)


def test_int8_onnx_is_qdq_and_passes_int8_parity(int8_onnx, convnet_run, convnet_export):
    proto = onnx.load(str(int8_onnx))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops  # every conv quantised, as QDQ
    weights = {i.name: i for i in proto.graph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights.values())  # int8 weights stored
    contract = read_onnx_contract(int8_onnx)
    assert contract["precision"] == "int8"
    assert {k: v for k, v in contract.items() if k != "precision"} == {
        k: v for k, v in convnet_export.contract.items() if k != "precision"}  # same model, same preprocessing
    r = check_parity(convnet_run, int8_onnx, limit=LIMIT, write=False)
    assert r.precision == "int8" and r.thresholds["p1_cosine"] == 0.98  # judged at the int8 thresholds
    assert r.passed, r.failures
    assert r.embedding["cosine_p50"] < 0.99999  # really computed in int8, not a copy of the fp32 graph


def test_int8_onnx_is_what_tensorrt_parses(int8_onnx):
    """onnx-tensorrt takes DequantizeLinear of INT8 tensors with zero points 0 only: ONNX Runtime's default int32
    bias quantisation made 6 DequantizeLinear of INT32 in the demo model; biases must stay float."""
    from ctxsim.export.trt_compat import onnx_problems

    assert onnx_problems(int8_onnx, 10) == [] and onnx_problems(int8_onnx, 11) == []
    proto = onnx.load(str(int8_onnx))
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert convs and all(n.input[2] in inits and inits[n.input[2]].data_type == onnx.TensorProto.FLOAT
                         for n in convs)  # biases stay float


def test_bad_calibration_is_caught_by_parity(tmp_path, convnet_run, convnet_export):
    """Flat grey images are no calibration set: the activation ranges are wrong for real drawings, and parity
    says so."""
    grey = [Image.new("L", (105, 105), 128) for _ in range(64)]
    out = quantize_onnx(convnet_export.onnx_path, image_batches(grey, convnet_export.contract),
                        out_path=tmp_path / "grey.int8.onnx")
    r = check_parity(convnet_run, out, limit=LIMIT, write=False)
    assert not r.passed and any("p1_cosine" in f for f in r.failures)


def test_calibration_images_come_from_the_training_classes(convnet_run):
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.nets import load_run
    from ctxsim.runs import run_config

    images = run_calibration_images(convnet_run, limit=40, seed=3)
    assert len(images) == 40 and all(im.size == (28, 28) for im in images)  # drawings of the shipped sample
    # every calibration image is a drawing of the training split: none equals an evaluation image
    _, card = load_run(convnet_run)
    ev = open_eval_dataset(run_config(convnet_run), card.preprocess, limit=LIMIT).with_transform(None)
    eval_bytes = {ev.load_image(i).tobytes() for i in range(len(ev))}
    assert not any(im.tobytes() in eval_bytes for im in images)
    assert run_calibration_images(convnet_run, limit=40, seed=3)[0].tobytes() == images[0].tobytes()  # seeded


def test_quantize_refusals(tmp_path, convnet_export):
    batch = [np.zeros((2, 1, 28, 28), np.float32)]
    with pytest.raises(ConfigError, match="quantise the fp32 model.onnx"):
        quantize_onnx(convnet_export.fp16_path, batch, out_path=tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="calibration method"):
        quantize_onnx(convnet_export.onnx_path, batch, out_path=tmp_path / "x.onnx", method="kl")
    with pytest.raises(ConfigError, match="no calibration batches"):
        quantize_onnx(convnet_export.onnx_path, [], out_path=tmp_path / "x.onnx")


def test_export_run_int8_into_the_manifest(tmp_path, convnet_run):
    from ctxsim.export import export_run, read_manifest

    result = export_run(convnet_run, tmp_path / "exp", fp16=False, int8=True, parity_limit=LIMIT)
    assert result.int8_path == tmp_path / "exp" / "model.int8.onnx" and result.int8_path.is_file()
    assert set(result.parity) == {"model.onnx", "model.int8.onnx"}
    assert result.parity["model.int8.onnx"].precision == "int8"
    m = read_manifest(tmp_path / "exp")
    assert m["artifacts"]["model.int8.onnx"]["precision"] == "int8" and m["parity"]["model.int8.onnx"]["passed"]
    assert open_runner(result.int8_path).run(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 64)
    json.dumps(result.to_dict())


def test_calibration_batches_are_preprocessed_real_images(tmp_path, omniglot_images, convnet_export):
    folder = tmp_path / "calib" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(omniglot_images[:20]):
        im.save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    batches = list(calibration_batches(tmp_path / "calib", convnet_export.contract, batch_size=8, limit=None))
    assert len(batches) == 2 and all(b.shape == (8, 1, 28, 28) and b.dtype == np.float32 for b in batches)
    files = list_images(tmp_path / "calib")
    np.testing.assert_array_equal(batches[0], preprocess_batch([Image.open(p) for p in files[:8]],
                                                               convnet_export.contract))
    assert len(list_images(tmp_path / "calib", limit=5)) == 5
    with pytest.raises(ConfigError, match="fewer than one batch"):
        list(calibration_batches(tmp_path / "calib", convnet_export.contract, batch_size=64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        list_images(tmp_path / "empty")
