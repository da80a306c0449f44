"""Parity on real Omniglot evaluation images: fp32 and fp16 ONNX pass their thresholds, a damaged model fails."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctxsim.errors import ConfigError, FingerprintMismatch, ParityFailed
from ctxsim.evaluate import retrieval_metrics
from ctxsim.export import assert_parity, check_parity, export_onnx, parse_thresholds
from ctxsim.export.parity import (
    DEFAULT_THRESHOLDS,
    cosine_rows,
    cross_recall_at_1,
    r1_flips,
    r1_margins,
    resolve_thresholds,
    topk_jaccard,
)

from export_helpers import make_run, perturb_onnx

LIMIT = 400  # 20 Omniglot evaluation classes x 20 drawings


@pytest.fixture(scope="module")
def fp32_report(convnet_run, convnet_export):
    return check_parity(convnet_run, convnet_export.onnx_path, limit=LIMIT)


def test_fp32_onnx_passes_on_real_images(fp32_report, convnet_export):
    r = fp32_report
    assert r.passed, r.failures
    assert r.precision == "fp32" and r.images == LIMIT and r.classes == 20 and r.dataset == "omniglot"
    assert r.thresholds == DEFAULT_THRESHOLDS["fp32"]
    assert r.embedding["cosine_min"] >= 0.9999 and r.embedding["norm_max_error"] < 1e-4
    assert r.retrieval["delta_points"]["R@1"] == 0.0
    assert set(r.retrieval["reference"]) >= {"R@1", "R@2", "R@4", "R@8", "MAP@R", "R-precision"}
    assert 0.0 < r.retrieval["reference"]["R@1"] <= 1.0  # not a degenerate (all-equal) embedding
    assert r.neighbours["k"] == 10 and r.neighbours["jaccard_mean"] > 0.99
    assert r.cross["R@1"] == pytest.approx(r.retrieval["reference"]["R@1"])
    assert {c["check"] for c in r.checks} == set(DEFAULT_THRESHOLDS["fp32"]) - {"tie_margin"}
    assert all(c["passed"] for c in r.checks)
    assert r.retrieval["ties"]["flips"] == 0 and r.retrieval["ties"]["tie_margin"] == 1e-5

    on_disk = json.loads((convnet_export.out_dir / "parity.json").read_text())
    assert on_disk["model.onnx"]["passed"] is True
    assert on_disk["model.onnx"]["fingerprint"] == convnet_export.fingerprint
    json.dumps(r.to_dict(), allow_nan=False)


def test_fp16_onnx_passes_fp16_thresholds(convnet_run, convnet_export, fp32_report):
    r = check_parity(convnet_run, convnet_export.fp16_path, limit=LIMIT)
    assert r.precision == "fp16" and r.thresholds == DEFAULT_THRESHOLDS["fp16"]  # inferred from the artifact
    assert r.passed, r.failures
    on_disk = json.loads((convnet_export.out_dir / "parity.json").read_text())
    assert set(on_disk) >= {"model.onnx", "model.fp16.onnx"}  # reports are merged, not replaced


def test_damaged_model_fails_parity(tmp_path, convnet_run, convnet_export):
    damaged = perturb_onnx(convnet_export.onnx_path, tmp_path / "damaged" / "model.onnx", scale=0.05)
    r = check_parity(convnet_run, damaged, limit=LIMIT)
    assert not r.passed
    assert any("min_cosine" in f for f in r.failures)
    assert r.embedding["cosine_min"] < 0.9999
    with pytest.raises(ParityFailed, match=r"parity failed for .*model.onnx \(fp32\): min cosine.*\(min_cosine\)") as e:
        assert_parity(convnet_run, damaged, limit=LIMIT, write=False)
    assert isinstance(e.value, AssertionError) and "\n" not in str(e.value)  # still fails a test, in one line
    assert json.loads((damaged.parent / "parity.json").read_text())["model.onnx"]["passed"] is False
    # the flips of a damaged model are decisive ones: the tie margin does not hide them from ΔR@1
    ties = r.retrieval["ties"]
    assert ties["flips"] > ties["flips_near_tied"]
    assert ties["delta_R@1_points"] != 0.0
    grid = tmp_path / "flips.png"
    only_r1 = check_parity(convnet_run, damaged, limit=LIMIT, write=False, flips_grid=grid,
                           thresholds="min_cosine=none,max_norm_error=none,max_abs_delta_r1_points=0.0")
    assert [f for f in only_r1.failures if "max_abs_delta_r1_points" in f]
    # the flipped queries, decisive ones first, each with its top-1 under both models, drawn one row each
    examples = only_r1.retrieval["ties"]["examples"]
    assert len(examples) == min(32, only_r1.retrieval["ties"]["flips"])
    margins = [abs(e["margin"]) for e in examples]
    assert margins == sorted(margins, reverse=True) and not examples[0]["near_tie"]
    for e in examples:  # a flip: the two top-1 neighbours disagree, and the margin's sign says which one hit
        assert e["reference_top1"] != e["query"] != e["artifact_top1"]
        assert e["reference_hit"] == (e["margin"] > 0) != e["artifact_hit"]
    from PIL import Image

    from ctxsim.deploy.search import grid_size

    with Image.open(grid) as im:
        assert im.size == grid_size(len(examples), 3)


def test_uint8_graph_passes_fp32_parity(tmp_path, convnet_run):
    result = export_onnx(convnet_run, tmp_path / "u8", input_format="uint8_nhwc")
    r = check_parity(convnet_run, result.onnx_path, limit=LIMIT, write=False)
    assert r.input_format == "uint8_nhwc"
    assert r.passed, r.failures


def test_thresholds_are_live(convnet_run, convnet_export):
    r = check_parity(convnet_run, convnet_export.onnx_path, limit=LIMIT, write=False,
                     thresholds="min_cosine=1.5,max_norm_error=none,min_topk_jaccard=0.5")
    assert not r.passed and len(r.failures) == 1 and "min_cosine" in r.failures[0]
    assert "max_norm_error" not in r.thresholds and r.thresholds["min_topk_jaccard"] == 0.5


def test_artifact_of_another_model_is_refused(tmp_path, convnet_run, omniglot_dir):
    other = make_run(tmp_path / "other", "convnet", omniglot_dir, seed=5)
    result = export_onnx(other, tmp_path / "other_export")
    with pytest.raises(FingerprintMismatch, match="exported from model"):
        check_parity(convnet_run, result.onnx_path, limit=LIMIT)


def test_parse_and_resolve_thresholds():
    assert parse_thresholds("min_cosine=0.99, max_abs_delta_r1_points=0.5") == {
        "min_cosine": 0.99, "max_abs_delta_r1_points": 0.5}
    assert parse_thresholds({"p1_cosine": "0.97", "max_norm_error": None}) == {
        "p1_cosine": 0.97, "max_norm_error": None}
    assert parse_thresholds(None) == {} and parse_thresholds("") == {}
    with pytest.raises(ConfigError, match="unknown parity threshold 'cosine'"):
        parse_thresholds("cosine=0.9")
    with pytest.raises(ConfigError, match="number"):
        parse_thresholds("min_cosine=high")
    with pytest.raises(ConfigError, match="key=value"):
        parse_thresholds("min_cosine")
    assert resolve_thresholds("int8") == {"p1_cosine": 0.98, "max_abs_delta_r1_points": 1.0, "max_norm_error": 1e-2,
                                          "tie_margin": 1e-2}
    assert resolve_thresholds("fp16", "max_abs_delta_r1_points=none") == {
        "min_cosine": 0.999, "max_norm_error": 1e-2, "tie_margin": 1e-3}
    assert resolve_thresholds("fp16", "tie_margin=none")["tie_margin"] == 0.0  # off: every flip counts
    with pytest.raises(ConfigError, match="precision"):
        resolve_thresholds("bf16")


def test_measures_on_small_arrays():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, np.sqrt(0.5)])
    j = topk_jaccard(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [4, 7, 8]]))
    np.testing.assert_allclose(j, [1.0, 1 / 5])
    labels = np.array([0, 0, 1, 1])
    g = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    assert cross_recall_at_1(g, g, labels) == 1.0
    q = g[[2, 3, 0, 1]]  # every query now looks like the other class
    assert cross_recall_at_1(q, g, labels) == 0.0


def test_r1_margins_match_recall_at_1_on_real_embeddings(fp32_report, convnet_run, convnet_export):
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.export import open_runner
    from ctxsim.export.parity import _embed_both
    from ctxsim.nets import load_run
    from ctxsim.runs import run_config

    model, card = load_run(convnet_run)
    dataset = open_eval_dataset(run_config(convnet_run), card.preprocess, limit=LIMIT)
    runner = open_runner(convnet_export.onnx_path)
    ref, _, labels = _embed_both(model, runner, dataset, dataset.with_transform(None), runner.contract, 64, None)
    margins = r1_margins(ref, labels, chunk=37)  # a chunk that does not divide N
    assert np.isfinite(margins).all()
    # the sign of the margin is the top-1 verdict: its mean is R@1 as retrieval_metrics computes it
    assert (margins > 0).mean() == pytest.approx(retrieval_metrics(ref, labels, ks=(1,))["R@1"])
    sims = ref.astype(np.float64) @ ref.T.astype(np.float64)
    i = 5
    same = labels == labels[i]
    same[i] = False
    assert margins[i] == pytest.approx(sims[i][same].max() - sims[i][labels != labels[i]].max(), abs=1e-6)


def test_r1_flips_leave_out_near_ties_only():
    labels = np.array([0, 0, 1, 1, 2])
    # item 0: decided by 0.3; item 1: a near-tie (4e-4); item 4 has no other item of its class
    e = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    margins = r1_margins(e, labels)
    assert np.isnan(margins[4]) and not np.isnan(margins[:4]).any()
    ref = np.array([0.3, 4e-4, 0.2, -0.1, np.nan])
    art = np.array([0.3, -2e-4, 0.2, -0.1, np.nan])  # only the near-tie flips
    assert r1_flips(ref, art, 1e-3) == {"tie_margin": 1e-3, "near_tied": 1, "flips": 1, "flips_near_tied": 1,
                                        "delta_R@1_points": 0.0}
    assert r1_flips(ref, art, 0.0)["delta_R@1_points"] == pytest.approx(-25.0)  # 1 of 4 valid queries
    art[0] = -0.01  # a decisive query flips too: it counts whatever the tie margin
    assert r1_flips(ref, art, 1e-3)["delta_R@1_points"] == pytest.approx(-25.0)
    art[3] = 0.05  # and a decisive gain cancels it in the net ΔR@1, as in R@1 itself
    out = r1_flips(ref, art, 1e-3)
    assert out["flips"] == 3 and out["flips_near_tied"] == 1 and out["delta_R@1_points"] == 0.0
